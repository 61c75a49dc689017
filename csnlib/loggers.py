"""Optional training dashboards behind one small interface: visdom (live plots in the browser) and TensorBoard.

main.py calls `make_logger(args, notions, run_dir)` once and then `log_epoch`, `log_masks`, `log_triplets`,
`log_embeddings` and `close`. visdom and torch.utils.tensorboard are imported only when asked for. A visdom server
that is down or dies never stops training: one warning, and the plots come back (redrawn in full) with the server.
Every request to it has one deadline for connecting, sending and reading the whole answer (timeout_s), so a server
that accepts and then answers a byte a second costs at most timeout_s per try.
"""
import http.client
import io
import logging
import os
import socket
import ssl
import sys
import threading
import time
import urllib.parse
import warnings

import numpy as np

# visdom line windows: (window id, title, [(metrics key, trace name)]); the per-notion window is added from `notions`
LINES = [
    ('loss', 'loss', [('train_loss', 'train'), ('val_loss', 'val')]),
    ('acc', 'triplet accuracy', [('train_acc', 'train'), ('val_acc', 'val')]),
    ('lr', 'learning rate', [('lr', 'lr')]),
    ('emb_norm', 'embedding norm', [('emb_norm', 'embedding norm')]),
    ('mask_norm', 'mask norm', [('mask_norm', 'mask norm')]),
    ('triplets_per_s', 'training speed (triplets per second)', [('triplets_per_s', 'triplets/s')]),
    ('seconds', 'seconds per epoch', [('seconds', 'seconds')]),
]
# TensorBoard scalar tags for the same metrics
SCALARS = {'train_loss': 'loss/train', 'val_loss': 'loss/val', 'train_acc': 'acc/train', 'val_acc': 'acc/val',
           'lr': 'lr', 'emb_norm': 'norm/embedding', 'mask_norm': 'norm/mask',
           'triplets_per_s': 'speed/triplets_per_s', 'seconds': 'speed/seconds_per_epoch'}
BAR_EVERY = 10  # the original plotted the stacked mask bars at epoch 1 and every 10 epochs


def make_logger(args, notions, run_dir):
    """The loggers that args ask for (--visdom, --tensorboard) behind one object; a no-op when neither is on."""
    loggers = []
    if getattr(args, 'visdom', False):
        env = getattr(args, 'visdom_env', None) or args.name
        loggers.append(VisdomLogger(getattr(args, 'visdom_server', 'http://localhost'),
                                    getattr(args, 'visdom_port', 8097), env, notions))
    if getattr(args, 'tensorboard', False):
        loggers.append(TensorBoardLogger(run_dir, notions))
    return Logger(loggers)


class Logger:
    """Passes each call on to every logger it holds; with none it does nothing."""

    def __init__(self, loggers=()):
        self.loggers = list(loggers)

    def log_epoch(self, metrics):
        for lg in self.loggers:
            lg.log_epoch(metrics)

    def log_masks(self, epoch, masks):
        for lg in self.loggers:
            lg.log_masks(epoch, masks)

    def log_triplets(self, images):
        for lg in self.loggers:
            lg.log_triplets(images)

    def log_embeddings(self, embeddings, labels, images=None):
        for lg in self.loggers:
            lg.log_embeddings(embeddings, labels, images)

    def close(self):
        for lg in self.loggers:
            lg.close()


def mask_names(notions, masks):
    """A name per mask row: the notions, or 'mask i' where the model's masks do not match them one to one."""
    return list(notions) if len(notions) == len(masks) else [f'mask {i}' for i in range(len(masks))]


def triplet_grid(images, pad=2, min_side=96):
    """(n, 3, H, W, 3) uint8 triplets -> one (H', W', 3) uint8 image, a row per triplet: anchor, close, far."""
    images = np.asarray(images, dtype=np.uint8)
    n, _, h, w, _ = images.shape
    k = max(1, -(-min_side // max(h, w)))  # blow small images up (nearest) so a glyph is readable in the browser
    images = images.repeat(k, axis=2).repeat(k, axis=3)  # (n, 3, kH, kW, 3)
    h, w = h * k, w * k
    grid = np.full((n * (h + pad) + pad, 3 * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        for j in range(3):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = images[i, j]
    return grid


class VisdomLogger:
    """Live plots in a visdom env. Keeps every point, so that a server that comes back gets all the plots redrawn."""

    def __init__(self, server, port, env, notions, retry_s=10.0, max_retry_s=60.0, timeout_s=5.0, out=None):
        self.server, self.port, self.env, self.notions = server, port, env, list(notions)
        # seconds before retrying a server that is down, doubling up to max_retry_s while it stays down; the time
        # limit of each request (a hung server costs at most this per try)
        self.retry_s, self.max_retry_s, self.timeout_s = retry_s, max_retry_s, timeout_s
        self.out = out or sys.stderr
        self.url = f'{server}:{port}/env/{env}'
        self.history = []  # every metrics dict logged, in order
        self.heatmap = None  # (epoch, masks) of the last log_masks
        self.bars = {}  # epoch -> masks, the stacked bar snapshots
        self.triplets = None  # the grid image
        self.viz = None  # the client, while the server answers
        self.synced = 0  # how many history entries the server holds
        self.resumed = None  # set at the first epoch: a resumed run extends the lines it left
        self.retry_in, self.next_try, self.error = retry_s, 0.0, ''
        logging.getLogger('visdom').setLevel(logging.ERROR)  # the client's chatter about sockets and sessions
        if self._connect():
            self._say(f'plotting to {self.url}')
        else:
            self._say(f'WARNING: no visdom server answers at {server}:{port} ({self.error}). Training goes on '
                      f'without plots; start one with `python -m visdom.server -port {port}` and they appear at '
                      f'{self.url}')

    def _say(self, msg):
        print(f'visdom: {msg}', file=self.out, flush=True)

    def _connect(self):
        """Make a client if the server answers now; True if it does."""
        try:
            self.viz = visdom_client(self.server, self.port, self.env, self.timeout_s)
        except (OSError, RuntimeError, ValueError) as e:
            self.error = str(e) or type(e).__name__
            self.next_try = time.monotonic() + self.retry_in
            self.retry_in = min(2 * self.retry_in, self.max_retry_s)
            return False
        self.retry_in = self.retry_s
        return True

    def _draw(self, what):
        """Run what(viz) if the server answers, or redraw everything if it answers again; never raise."""
        back = self.viz is None
        if back and (time.monotonic() < self.next_try or not self._connect()):
            return
        try:
            if back:  # a server that was down (or restarted, and so empty): draw everything from the start
                self._all_windows(self.viz)
                self._say(f'the server at {self.server}:{self.port} answers; all plots drawn at {self.url}')
            else:
                what(self.viz)
        except Exception as e:  # noqa: BLE001 - a plot must never stop training
            self.viz = None
            self.next_try = time.monotonic() + self.retry_in
            self._say(f'WARNING: plotting failed ({type(e).__name__}: {e}). Training goes on; the plots come back '
                      f'when the server at {self.server}:{self.port} answers again')

    def _all_windows(self, viz):
        self._lines(viz, self.history, update=None)
        self.synced = len(self.history)
        if self.heatmap is not None:
            self._heatmap(viz, *self.heatmap)
        for epoch, masks in self.bars.items():
            self._bar(viz, epoch, masks)
        if self.triplets is not None:
            self._triplets(viz, self.triplets)

    def _windows(self):
        """[(window id, title, [(key or (dict key, sub key), trace name)])] for the line plots."""
        first = (self.history[0].get('val_acc_per_notion') or {}) if self.history else {}
        names = [n for n in self.notions if n in first] + [n for n in first if n not in self.notions]
        per_notion = [(('val_acc_per_notion', n), n) for n in names]  # the notions trained on, in index order
        return LINES[:2] + [('acc_per_notion', 'val accuracy per notion', per_notion)] + LINES[2:]

    def _lines(self, viz, rows, update):
        """Plot rows (metrics dicts) in every line window: update None replaces a window, 'append' extends it."""
        for win, title, traces in self._windows():
            pts = []  # (epoch, [value per trace]) for the rows that hold every trace of this window
            for m in rows:
                vals = [m.get(k[0], {}).get(k[1]) if isinstance(k, tuple) else m.get(k) for k, _ in traces]
                if all(v is not None and np.isfinite(v) for v in vals):  # NaN would break the page's JSON
                    pts.append((m['epoch'], vals))
            if not pts:
                continue
            x = np.array([e for e, _ in pts], dtype=float)  # (T,)
            y = np.array([v for _, v in pts], dtype=float)  # (T, K)
            names = [name for _, name in traces]
            if len(names) > 1:
                x = np.repeat(x[:, None], len(names), axis=1)  # (T, K): visdom wants one x column per trace
            else:
                y = y[:, 0]
            opts = dict(title=title, xlabel='epoch', legend=names, showlegend=len(names) > 1,
                        width=450, height=320, marginbottom=50, marginleft=60)
            viz.line(X=x, Y=y, win=win, update=update, opts=opts)

    def _heatmap(self, viz, epoch, masks):
        viz.heatmap(X=masks, win='masks', opts=dict(
            title=f'masks, notion x embedding dimension (epoch {epoch})', rownames=mask_names(self.notions, masks),
            xlabel='embedding dimension', colormap='Viridis', width=900, height=320, marginleft=110))

    def _bar(self, viz, epoch, masks):
        viz.bar(X=masks.T, win=f'masks_bar_{epoch:04d}', opts=dict(  # (D, n_notions): a bar per dimension
            stacked=True, legend=mask_names(self.notions, masks), title=f'masks stacked over notions (epoch {epoch})',
            xlabel='embedding dimension', width=900, height=320))

    def _triplets(self, viz, grid):
        viz.image(grid.transpose(2, 0, 1), win='triplets', opts=dict(  # (3, H', W')
            title='val triplets: anchor, close, far'))

    def log_epoch(self, metrics):
        self.history.append(dict(metrics))
        if self.resumed is None:
            self.resumed = metrics['epoch'] > 1

        def new_points(viz):
            # a resumed run extends the lines it left; a fresh one starts them over
            update = 'append' if self.synced or self.resumed else None
            self._lines(viz, self.history[self.synced:], update)
            self.synced = len(self.history)
        self._draw(new_points)

    def log_masks(self, epoch, masks):
        if masks is None:  # a model without masks
            return
        masks = np.nan_to_num(np.asarray(masks, dtype=float))  # (n_notions, D)
        self.heatmap = (epoch, masks)
        bar = epoch == 1 or epoch % BAR_EVERY == 0
        if bar:
            self.bars[epoch] = masks

        def plot(viz):
            self._heatmap(viz, epoch, masks)
            if bar:
                self._bar(viz, epoch, masks)
        self._draw(plot)

    def log_triplets(self, images):
        self.triplets = triplet_grid(images)
        self._draw(lambda viz: self._triplets(viz, self.triplets))

    def log_embeddings(self, embeddings, labels, images=None):
        pass  # the projector is TensorBoard's

    def close(self):
        self.viz = None  # every request has its own connection: nothing is left open


def post(url, body, timeout_s):
    """POST body (str) to an http(s) URL and return (status, text), all of it (connect, send, read the whole answer)
    within timeout_s seconds of the call; else ConnectionError. Each socket operation gets the time that is left, and
    a timer shuts the socket at the deadline (a TLS handshake is several reads), so a server that drips its answer a
    byte at a time is cut off. One connection per request (HTTP/1.0), no proxy."""
    deadline = time.monotonic() + timeout_s
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ('http', 'https') or not u.hostname:
        raise ValueError(f'not an http(s) URL: {url!r}')
    port = u.port or (443 if u.scheme == 'https' else 80)
    path = (u.path or '/') + (f'?{u.query}' if u.query else '')
    data = body.encode('utf-8')
    host = u.hostname if ':' not in u.hostname else f'[{u.hostname}]'
    request = (f'POST {path} HTTP/1.0\r\nHost: {host}:{port}\r\nContent-Length: {len(data)}\r\n'
               f'Connection: close\r\n\r\n').encode('latin-1') + data

    def left():
        t = deadline - time.monotonic()
        if t <= 0:
            raise TimeoutError
        return t

    sock, timer, chunks = None, None, []
    try:
        sock = socket.create_connection((u.hostname, port), timeout=left())
        timer = threading.Timer(left(), _shut, (sock,))
        timer.daemon = True
        timer.start()
        if u.scheme == 'https':
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
        sock.settimeout(left())
        sock.sendall(request)
        while True:  # the server closes the connection after its answer
            sock.settimeout(left())
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        left()  # a socket shut by the timer reads as the end
    except OSError as e:  # TimeoutError included
        if isinstance(e, TimeoutError) or time.monotonic() >= deadline:  # timed out, or cut off by the timer
            raise ConnectionError(f'no whole answer from {u.hostname}:{port} within {timeout_s:g} s') from None
        raise ConnectionError(f'{u.hostname}:{port}: {e.strerror or e}') from None
    finally:
        if timer is not None:
            timer.cancel()
        if sock is not None:
            sock.close()
    try:
        r = http.client.HTTPResponse(_Received(b''.join(chunks)))
        r.begin()
        return r.status, r.read().decode('utf-8', 'replace')
    except (http.client.HTTPException, ValueError) as e:
        raise ConnectionError(f'{u.hostname}:{port} answered something that is not HTTP ({type(e).__name__})') from None


def _shut(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Received:
    """The bytes of a whole answer, as the socket http.client.HTTPResponse parses."""

    def __init__(self, data):
        self.data = data

    def makefile(self, mode):
        return io.BytesIO(self.data)


def visdom_client(server, port, env, timeout_s):
    """visdom's client, every request under one deadline of timeout_s (post), errors raised instead of printed, no
    incoming socket."""
    import visdom

    class Client(visdom.Visdom):
        def _handle_post(self, url, data=None):
            status, text = post(url, data or '', timeout_s)
            if status >= 400:
                raise RuntimeError(f'visdom server answered HTTP {status} to {url}: {text[:200]}')
            return text

        def win_exists(self, win, env=None):  # visdom's prints "Error connecting" on failure; raise instead
            return self._win_exists_wrap(win, env) == 'true'

    with warnings.catch_warnings():  # its own use of the deprecated logger.warn
        warnings.simplefilter('ignore', DeprecationWarning)
        return Client(server=server, port=port, env=env, raise_exceptions=True, use_incoming_socket=False)


class TensorBoardLogger:
    """The same scalars, the masks as an image, the triplets and a projector embedding, in run_dir/tensorboard."""

    def __init__(self, run_dir, notions):
        from torch.utils.tensorboard import SummaryWriter

        from csnlib.errors import UserError
        path = os.path.join(run_dir, 'tensorboard')
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f'--tensorboard writes its logs into the folder {path}, but that is a file: move it away, '
                            f'or drop --tensorboard')
        try:
            self.writer = SummaryWriter(log_dir=path)
        except OSError as e:
            raise UserError(f'--tensorboard: cannot make the folder {path} ({e.strerror or e}): fix the folder\'s '
                            f'permissions or free space, or drop --tensorboard') from None
        self.notions = list(notions)

    def log_epoch(self, metrics):
        step = metrics['epoch']
        for key, tag in SCALARS.items():
            if metrics.get(key) is not None:
                self.writer.add_scalar(tag, metrics[key], step)
        for notion, acc in (metrics.get('val_acc_per_notion') or {}).items():
            self.writer.add_scalar(f'acc_per_notion/{notion}', acc, step)
        self.writer.flush()

    def log_masks(self, epoch, masks):
        if masks is None:
            return
        masks = np.asarray(masks, dtype=float)  # (n_notions, D)
        self.writer.add_image('masks', mask_image(masks, mask_names(self.notions, masks)), epoch,
                              dataformats='HWC')

    def log_triplets(self, images):
        self.writer.add_image('val triplets (anchor, close, far)', triplet_grid(images), 0, dataformats='HWC')

    def log_embeddings(self, embeddings, labels, images=None):
        import torch
        header = list(labels)
        rows = [list(r) for r in zip(*(labels[n] for n in header))]  # (N, n_notions) of str
        if not header:  # no labels (the paper's Zappos release): the projector shows the points without metadata
            rows, header = None, None
        elif len(header) == 1:  # one column: the projector's format then has no header line
            rows, header = [r[0] for r in rows], None
        label_img = None
        if images is not None:
            label_img = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W)
        self.writer.add_embedding(torch.as_tensor(np.asarray(embeddings, dtype=np.float32)), metadata=rows,
                                  metadata_header=header, label_img=label_img, tag='val_embedding')

    def close(self):
        self.writer.close()


def mask_image(masks, notions):
    """(n_notions, D) masks -> a labelled heatmap as an (H, W, 3) uint8 image, drawn with matplotlib (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 0.4 * len(notions) + 1.2), dpi=80)
    canvas = FigureCanvasAgg(fig)
    from csnlib.pictures import draw_masks
    draw_masks(fig.add_subplot(), masks, notions)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
