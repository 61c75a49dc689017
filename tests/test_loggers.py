"""The dashboards: a real visdom server (started offline from visdom_static.py's files), read back through the visdom
client and opened in headless Chromium; TensorBoard's event files read back; main.py --visdom end to end."""
import argparse
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import warnings

import numpy as np
import pytest
import requests

from conftest import CHROMIUM_FLAGS, FAST, REPO, chromium_path, make_dataset
from csnlib import loggers
from csnlib.errors import UserError
from tools import visdom_static

NOTIONS = ['character', 'font', 'bold', 'italic']
LINE_WINDOWS = {'loss': ['train', 'val'], 'acc': ['train', 'val'], 'acc_per_notion': NOTIONS, 'lr': ['lr'],
                'emb_norm': ['embedding norm'], 'mask_norm': ['mask norm'], 'triplets_per_s': ['triplets/s'],
                'seconds': ['seconds']}
DEAD_PROXY = 'http://127.0.0.1:9'  # nothing listens there: a server that tries to reach the internet fails loudly


def fake_metrics(epoch, notions=NOTIONS):
    return dict(epoch=epoch, lr=0.1 * 0.985 ** epoch, train_loss=1.0 / epoch, train_acc=0.5 + 0.01 * epoch,
                val_loss=1.1 / epoch, val_acc=0.49 + 0.01 * epoch,
                val_acc_per_notion={n: 0.4 + 0.01 * epoch + 0.1 * i for i, n in enumerate(notions)},
                emb_norm=3.0 + epoch, mask_norm=2.0 + epoch, seconds=10.0, triplets_per_s=1000.0 + epoch)


def fake_masks(epoch, dim=16):
    return np.maximum(np.random.default_rng(epoch).normal(size=(len(NOTIONS), dim)), 0)  # (n_notions, D), relu'd


def fake_triplets(n=4, size=24):
    return np.random.default_rng(0).integers(0, 256, (n, 3, size, size, 3), dtype=np.uint8)


# ---- no server needed ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_no_logger_asked_is_a_noop_and_imports_neither_visdom_nor_tensorboard():
    code = ("import sys, argparse, numpy as np\nfrom csnlib import loggers\n"
            "args = argparse.Namespace(visdom=False, tensorboard=False, name='x')\n"
            "lg = loggers.make_logger(args, ['a', 'b'], 'runs/x')\n"
            "lg.log_epoch({'epoch': 1, 'lr': 0.1}); lg.log_masks(1, np.ones((2, 4))); lg.log_masks(1, None)\n"
            "lg.log_triplets(np.zeros((1, 3, 4, 4, 3), np.uint8))\n"
            "lg.log_embeddings(np.zeros((2, 4)), {'a': ['x', 'y']})\n"
            "lg.close()\n"
            "print(sorted(m for m in ('visdom', 'torch.utils.tensorboard', 'tensorboard') if m in sys.modules))\n")
    p = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == '[]' and p.stderr == ''


def test_triplet_grid_puts_one_triplet_per_row_against_a_loop():
    images = fake_triplets(n=2, size=4)
    grid = loggers.triplet_grid(images, pad=2, min_side=8)  # 4 px images are blown up 2x
    assert grid.shape == (2 + 2 * (8 + 2), 2 + 3 * (8 + 2), 3) and grid.dtype == np.uint8
    expected = np.full_like(grid, 255)
    for i in range(2):
        for j in range(3):
            for y in range(8):
                for x in range(8):
                    expected[2 + i * 10 + y, 2 + j * 10 + x] = images[i, j, y // 2, x // 2]
    np.testing.assert_array_equal(grid, expected)


def test_tensorboard_writes_scalars_masks_triplets_and_projector(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    args = argparse.Namespace(visdom=False, tensorboard=True, name='tb')
    lg = loggers.make_logger(args, NOTIONS, str(tmp_path))
    lg.log_triplets(fake_triplets())
    for epoch in (1, 2, 3):
        lg.log_epoch(fake_metrics(epoch))
        lg.log_masks(epoch, fake_masks(epoch))
    n = 10
    labels = {'character': [f'c{i % 3}' for i in range(n)], 'font': [f'f{i % 2}' for i in range(n)]}
    images = np.random.default_rng(1).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    lg.log_embeddings(np.random.default_rng(2).normal(size=(n, 5)), labels, images)
    lg.close()

    ea = EventAccumulator(str(tmp_path / 'tensorboard'), size_guidance={'scalars': 0, 'images': 0})
    ea.Reload()
    tags = set(ea.Tags()['scalars'])
    assert tags == set(loggers.SCALARS.values()) | {f'acc_per_notion/{n}' for n in NOTIONS}
    for key, tag in loggers.SCALARS.items():
        assert [(e.step, round(e.value, 4)) for e in ea.Scalars(tag)] == \
               [(ep, round(fake_metrics(ep)[key], 4)) for ep in (1, 2, 3)], tag
    assert [round(e.value, 4) for e in ea.Scalars('acc_per_notion/italic')] == [0.71, 0.72, 0.73]
    assert [e.step for e in ea.Images('masks')] == [1, 2, 3]
    assert len(ea.Images('val triplets (anchor, close, far)')) == 1
    proj = tmp_path / 'tensorboard' / '00000' / 'val_embedding'
    meta = (proj / 'metadata.tsv').read_text().splitlines()
    assert meta[0] == 'character\tfont' and meta[1:] == [f'c{i % 3}\tf{i % 2}' for i in range(n)]
    assert len((proj / 'tensors.tsv').read_text().splitlines()) == n and (proj / 'sprite.png').exists()
    assert 'val_embedding' in (tmp_path / 'tensorboard' / 'projector_config.pbtxt').read_text()


@pytest.mark.parametrize('labels', [{}, {'image': ['a.jpg', 'b.jpg', 'c.jpg']}])
def test_the_projector_takes_a_dataset_without_labels_or_with_one_column(tmp_path, labels):
    """The paper's Zappos release has no labels.csv: the projector once failed at the end of training (#labels
    should equal #data points)."""
    lg = loggers.make_logger(argparse.Namespace(visdom=False, tensorboard=True, name='tb'), ['class'], str(tmp_path))
    lg.log_embeddings(np.zeros((3, 4)), labels, np.zeros((3, 8, 8, 3), np.uint8))
    lg.close()
    proj = tmp_path / 'tensorboard' / '00000' / 'val_embedding'
    assert len((proj / 'tensors.tsv').read_text().splitlines()) == 3
    meta = proj / 'metadata.tsv'
    assert (meta.read_text().splitlines() == ['a.jpg', 'b.jpg', 'c.jpg']) if labels else not meta.exists()


def test_a_tensorboard_path_that_is_a_file_is_one_error_naming_the_flag(tmp_path):
    from csnlib.errors import UserError
    (tmp_path / 'tensorboard').write_text('not a folder')
    args = argparse.Namespace(visdom=False, tensorboard=True, name='tb')
    with pytest.raises(UserError, match=r'^--tensorboard writes its logs into the folder .*tensorboard, but that is a '
                                        r'file: move it away, or drop --tensorboard$'):
        loggers.make_logger(args, NOTIONS, str(tmp_path))
    assert (tmp_path / 'tensorboard').read_text() == 'not a folder'


@pytest.mark.slow
def test_main_with_tensorboard_onto_a_file_stops_before_training(tmp_path):
    from conftest import error_line, run_main
    data = tmp_path / 'shapes'
    make_dataset(str(data))
    (tmp_path / 'runs' / 'tb').mkdir(parents=True)
    (tmp_path / 'runs' / 'tb' / 'tensorboard').write_text('')
    p = run_main('--data', data, '--runs', tmp_path / 'runs', '--name', 'tb', '--epochs', 1, '--tensorboard', *FAST,
                 check=False)
    assert error_line(p).startswith('error: --tensorboard writes its logs into the folder ')
    assert 'epoch 1' not in p.stdout and not (tmp_path / 'runs' / 'tb' / 'checkpoint.pth.tar').exists()


class DripServer:
    """A server on 127.0.0.1 that accepts every connection and reads the request; mode 'ok' answers `true` at once,
    mode 'drip' sends a valid answer one byte every `every` seconds (each read gets a byte long before any read
    timeout, so only a total deadline stops the client)."""

    def __init__(self, every=0.05):
        import threading
        self.every, self.mode, self.requests, self.stop = every, 'drip', [], threading.Event()
        self.sock = socket.create_server(('127.0.0.1', 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            data = b''
            while b'\r\n\r\n' not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, body = data.split(b'\r\n\r\n', 1)
            n = int(next((ln.split(b':')[1] for ln in head.split(b'\r\n')
                          if ln.lower().startswith(b'content-length')), 0))
            while len(body) < n:
                body += conn.recv(65536)
            self.requests.append(head.split(b' ')[1].decode())
            answer = b'HTTP/1.0 200 OK\r\nX-Padding: ' + b'.' * 200 + b'\r\nContent-Length: 4\r\n\r\ntrue'
            if self.mode == 'ok':
                conn.sendall(answer)
                return
            for i in range(len(answer)):
                if self.stop.wait(self.every):
                    return
                try:
                    conn.sendall(answer[i:i + 1])
                except OSError:  # the client gave up
                    return

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.fixture
def drip_server():
    srv = DripServer()
    yield srv
    srv.close()


def test_post_has_one_deadline_for_the_whole_answer(drip_server):
    drip_server.mode = 'ok'
    assert loggers.post(f'http://127.0.0.1:{drip_server.port}/env/x', '{"eid": "x"}', 1.0) == (200, 'true')
    assert drip_server.requests == ['/env/x']
    drip_server.mode = 'drip'
    t = time.monotonic()
    with pytest.raises(ConnectionError, match=rf'no whole answer from 127.0.0.1:{drip_server.port} within 0.5 s'):
        loggers.post(f'http://127.0.0.1:{drip_server.port}/events', '{}', 0.5)
    assert 0.45 < time.monotonic() - t < 1.0  # bytes kept coming every 0.05 s: only the total deadline stopped it
    port = free_port()  # nothing listens there
    with pytest.raises(ConnectionError, match=f'127.0.0.1:{port}: Connection refused'):
        loggers.post(f'http://127.0.0.1:{port}/events', '{}', 0.5)


def test_a_server_that_drips_costs_at_most_timeout_s_at_start_and_mid_run(drip_server):
    """docs/dashboards.md: a hung server costs at most timeout_s per retry, here for one answering a byte every
    0.05 s (the per-read timeouts of an HTTP library never fire on it)."""
    import visdom  # noqa: F401 - imported before the clock starts
    out = io.StringIO()
    t = time.monotonic()
    lg = loggers.VisdomLogger('http://127.0.0.1', drip_server.port, 'drip', NOTIONS, retry_s=0.0, timeout_s=0.3,
                              out=out)
    assert time.monotonic() - t < 0.8, 'at start'
    msgs = out.getvalue().splitlines()
    assert len(msgs) == 1 and msgs[0].startswith('visdom: WARNING: no visdom server answers at http://127.0.0.1:')
    assert f'(no whole answer from 127.0.0.1:{drip_server.port} within 0.3 s)' in msgs[0]

    drip_server.mode = 'ok'  # the server answers: the plots are drawn
    fill(lg, [1])
    assert out.getvalue().splitlines()[1].startswith('visdom: the server at http://127.0.0.1:')
    assert '/env/drip' in drip_server.requests and '/events' in drip_server.requests
    drip_server.mode = 'drip'  # and drips mid-run: each retry (here every call, retry_s=0) gives up after timeout_s
    for epoch in (2, 3):
        for call in (lambda: lg.log_epoch(fake_metrics(epoch)), lambda: lg.log_masks(epoch, fake_masks(epoch))):
            t = time.monotonic()
            call()
            assert time.monotonic() - t < 0.8, f'mid-run, epoch {epoch}'
    warnings_ = [m for m in out.getvalue().splitlines() if 'WARNING' in m]
    assert len(warnings_) == 2 and warnings_[1].startswith('visdom: WARNING: plotting failed (ConnectionError: no '
                                                           'whole answer from 127.0.0.1:'), out.getvalue()
    lg.close()


def fake_npm_packages(tmp_path, monkeypatch):
    """Small stand-ins for the npm tarballs (same names and layout), with PACKAGES pointing at their hashes."""
    src = tmp_path / 'npm'
    src.mkdir()
    packages = {}
    for spec, (_, files) in visdom_static.PACKAGES.items():
        pkg = tmp_path / 'build' / spec / 'package'
        for inner, _ in files:
            (pkg / inner).parent.mkdir(parents=True, exist_ok=True)
            (pkg / inner).write_text(f'{spec}:{inner}')
        tgz = src / visdom_static.tarball_name(spec)
        with tarfile.open(tgz, 'w:gz') as t:
            t.add(pkg, arcname='package')
        packages[spec] = (hashlib.sha1(tgz.read_bytes()).hexdigest(), files)
    monkeypatch.setattr(visdom_static, 'PACKAGES', packages)
    return src


@pytest.mark.slow
def test_visdom_static_installs_every_file_from_a_folder_or_a_bundle_and_checks_hashes(tmp_path, monkeypatch):
    src = fake_npm_packages(tmp_path, monkeypatch)
    bundle = tmp_path / 'bundle.tar.gz'
    with tarfile.open(bundle, 'w:gz') as t:
        t.add(src, arcname='visdom-npm')
    for source in (src, bundle):
        static = tmp_path / f'static_{source.name}'
        assert 'version.built' in visdom_static.missing_files(str(static), '0.2.4')
        work = tmp_path / f'work_{source.name}'
        work.mkdir()
        visdom_static.install(visdom_static.find_tarballs(str(source), str(work)), str(static), '0.2.4')
        assert visdom_static.missing_files(str(static), '0.2.4') == []
        assert visdom_static.missing_files(str(static), '0.2.5') == ['version.built']
        for spec, (_, files) in visdom_static.PACKAGES.items():
            for inner, dest in files:
                assert (static / dest).read_text() == f'{spec}:{inner}'
    (src / 'sjcl-1.0.7.tgz').write_bytes(b'corrupt')
    with pytest.raises(UserError, match='sjcl-1.0.7.tgz has sha1'):
        visdom_static.install(visdom_static.find_tarballs(str(src), str(tmp_path)), str(tmp_path / 's3'), '0.2.4')
    (src / 'd3-3.5.17.tgz').unlink()
    with pytest.raises(UserError, match='lacks d3-3.5.17.tgz'):
        visdom_static.find_tarballs(str(src), str(tmp_path))


class FakeDownloads:
    """Stands in for urllib's opener and requests.get inside visdom's build.py; records every URL asked for."""

    def __init__(self):
        self.urls = []

    def open(self, req, *a, **k):
        self.urls.append(req.full_url)
        return io.BytesIO(b'x')

    def get(self, url, *a, **k):
        self.urls.append(url)
        return argparse.Namespace(content=b'x')


@pytest.mark.slow
def test_visdom_static_files_are_exactly_those_visdoms_build_py_downloads(tmp_path, monkeypatch, visdom_files):
    import visdom.server.build as build
    fake = FakeDownloads()
    monkeypatch.setattr(build.request.OpenerDirector, 'open', lambda self, req, *a, **k: fake.open(req))
    monkeypatch.setattr(requests, 'get', fake.get)
    # an empty folder: build.py downloads everything; its file names must be ours
    build.download_scripts(install_dir=str(tmp_path / 'empty'))
    wrote = {os.path.relpath(os.path.join(r, f), tmp_path / 'empty' / 'static')
             for r, _, fs in os.walk(tmp_path / 'empty') for f in fs}
    ours = {dest for _, files in visdom_static.PACKAGES.values() for _, dest in files}
    assert len(fake.urls) == len(ours) - 1  # the svg font is ours twice: under its URL and its plain name
    assert wrote == ours - {'fonts/glyphicons-halflings-regular.svg'} | {'version.built'}
    # a copy of what visdom_static.py installed: build.py downloads nothing
    fake.urls.clear()
    shutil.copytree(os.path.join(visdom_files, 'static'), tmp_path / 'copy' / 'static')
    build.download_scripts(install_dir=str(tmp_path / 'copy'))
    assert fake.urls == []


# ---- a real visdom server ---------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def visdom_files():
    """The installed visdom's folder, with the browser files in place (installed with npm if they are missing)."""
    cmd = [sys.executable, os.path.join(REPO, 'tools', 'visdom_static.py')]
    if subprocess.run(cmd + ['--check'], capture_output=True).returncode != 0:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            pytest.fail("visdom's browser files are missing and `python tools/visdom_static.py` could not fetch them "
                        f"(setup.sh runs it; offline, use --from DIR):\n{p.stdout}{p.stderr}")
    return visdom_static.visdom_dir()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Server:
    """`python -m visdom.server` on 127.0.0.1, with every proxy pointing nowhere so any download attempt fails."""

    def __init__(self, port, workdir):
        self.port, self.workdir, self.proc = port, workdir, None
        self.log = os.path.join(workdir, f'server_{port}.log')

    def start(self):
        env = dict(os.environ, PYTHONUNBUFFERED='1', NO_PROXY='127.0.0.1,localhost', no_proxy='127.0.0.1,localhost')
        for k in ('HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy', 'ALL_PROXY', 'all_proxy'):
            env[k] = DEAD_PROXY
        with open(self.log, 'a') as log:
            self.proc = subprocess.Popen(
                [sys.executable, '-m', 'visdom.server', '-port', str(self.port), '--hostname', '127.0.0.1',
                 '-bind_local', '-env_path', os.path.join(self.workdir, 'envs')],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f'visdom.server exited {self.proc.returncode}:\n{open(self.log).read()[-3000:]}')
            try:
                if requests.get(f'{self.url}/', timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        else:
            pytest.fail(f'visdom.server did not answer in 60 s:\n{open(self.log).read()[-3000:]}')
        text = open(self.log).read()
        assert 'Downloading' not in text and 'while downloading' not in text, text
        return self

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    @property
    def url(self):
        return f'http://127.0.0.1:{self.port}'


@pytest.fixture(scope='module')
def server(visdom_files, tmp_path_factory):
    s = Server(free_port(), str(tmp_path_factory.mktemp('visdom'))).start()
    yield s
    s.proc.kill()
    s.proc.wait(10)


def windows(port, env):
    """{window id: window json} of an env, read back through visdom's own client."""
    import visdom
    with warnings.catch_warnings():  # visdom's own use of the deprecated logger.warn
        warnings.simplefilter('ignore', DeprecationWarning)
        viz = visdom.Visdom(server='http://127.0.0.1', port=port, env=env, raise_exceptions=True,
                            use_incoming_socket=False)
    return json.loads(viz.get_window_data(env=env))


def traces(win):
    return {t['name']: (t['x'], t['y']) for t in win['content']['data']}


def fill(lg, epochs):
    for epoch in epochs:
        lg.log_epoch(fake_metrics(epoch))
        lg.log_masks(epoch, fake_masks(epoch))


def check_lines(wins, epochs):
    """Every line window holds one point per epoch in epochs, in every trace, named as it should be."""
    for win, names in LINE_WINDOWS.items():
        tr = traces(wins[win])
        assert list(tr) == names, win
        for name, (x, y) in tr.items():
            assert x == list(epochs), (win, name, x)
    loss = traces(wins['loss'])
    assert loss['val'][1] == pytest.approx([1.1 / e for e in epochs])
    assert traces(wins['acc_per_notion'])['bold'][1] == pytest.approx([0.6 + 0.01 * e for e in epochs])


@pytest.mark.slow
def test_visdom_dashboard_has_every_plot_with_one_point_per_epoch(server):
    out = io.StringIO()
    lg = loggers.VisdomLogger('http://127.0.0.1', server.port, 'dash', NOTIONS, out=out)
    lg.log_triplets(fake_triplets())
    fill(lg, range(1, 12))
    lg.close()
    assert out.getvalue() == f'visdom: plotting to http://127.0.0.1:{server.port}/env/dash\n'  # nothing else

    wins = windows(server.port, 'dash')
    assert set(wins) == set(LINE_WINDOWS) | {'masks', 'masks_bar_0001', 'masks_bar_0010', 'triplets'}
    check_lines(wins, range(1, 12))
    assert wins['acc_per_notion']['title'] == 'val accuracy per notion'
    heat = wins['masks']['content']['data'][0]
    assert heat['type'] == 'heatmap' and heat['y'] == NOTIONS
    np.testing.assert_allclose(heat['z'], fake_masks(11))
    bar = traces(wins['masks_bar_0010'])
    assert list(bar) == NOTIONS and wins['masks_bar_0010']['content']['layout']['barmode'] == 'stack'
    np.testing.assert_allclose(bar['font'][1], fake_masks(10)[1])
    assert wins['triplets']['type'] == 'image'


@pytest.mark.slow
def test_a_resumed_run_extends_the_lines_and_a_new_run_starts_them_over(server):
    out = io.StringIO()
    lg = loggers.VisdomLogger('http://127.0.0.1', server.port, 'resume', NOTIONS, out=out)
    fill(lg, [1, 2, 3])
    lg = loggers.VisdomLogger('http://127.0.0.1', server.port, 'resume', NOTIONS, out=out)  # --resume at epoch 4
    fill(lg, [4, 5])
    check_lines(windows(server.port, 'resume'), [1, 2, 3, 4, 5])
    lg = loggers.VisdomLogger('http://127.0.0.1', server.port, 'resume', NOTIONS, out=out)  # the same name again
    fill(lg, [1, 2])
    check_lines(windows(server.port, 'resume'), [1, 2])


@pytest.mark.slow
def test_visdom_down_at_start_dead_or_hung_mid_run_never_stops_training(visdom_files, tmp_path):
    import visdom  # noqa: F401 - imported before the clock starts
    srv = Server(free_port(), str(tmp_path))
    out = io.StringIO()
    t = time.monotonic()
    lg = loggers.VisdomLogger('http://127.0.0.1', srv.port, 'outage', NOTIONS, retry_s=0.0, timeout_s=1.0, out=out)
    fill(lg, [1, 2])
    assert time.monotonic() - t < 1  # no retry loop, no waiting
    msgs = out.getvalue().splitlines()
    assert len(msgs) == 1 and msgs[0].startswith('visdom: WARNING: no visdom server answers at http://127.0.0.1:')
    assert 'python -m visdom.server' in msgs[0]

    srv.start()
    try:
        fill(lg, [3])  # reconnects and draws epochs 1..3
        check_lines(windows(srv.port, 'outage'), [1, 2, 3])
        assert out.getvalue().splitlines()[1].startswith('visdom: the server at http://127.0.0.1:')

        srv.kill()  # dies mid-run
        for epoch in (4, 5, 6):
            t = time.monotonic()
            fill(lg, [epoch])
            assert time.monotonic() - t < 0.5, 'a dead server must not slow an epoch down'
        msgs = out.getvalue().splitlines()[2:]
        assert len(msgs) == 1 and msgs[0].startswith('visdom: WARNING: plotting failed (ConnectionError'), msgs
        assert 'Traceback' not in out.getvalue()

        srv.start()  # back: everything since epoch 1 is redrawn on the new, empty server
        fill(lg, [7])
        check_lines(windows(srv.port, 'outage'), range(1, 8))
        assert set(windows(srv.port, 'outage')) >= {'masks', 'masks_bar_0001'}

        srv.proc.send_signal(signal.SIGSTOP)  # hung: each request gives up after timeout_s
        t = time.monotonic()
        fill(lg, [8])
        assert time.monotonic() - t < 3 * lg.timeout_s
        srv.proc.send_signal(signal.SIGCONT)
        fill(lg, [9])
        check_lines(windows(srv.port, 'outage'), range(1, 10))
        warnings = [m for m in out.getvalue().splitlines() if 'WARNING' in m]
        assert len(warnings) == 3, out.getvalue()  # one per outage: down at start, killed, hung
    finally:
        srv.proc.kill()
        srv.proc.wait(10)


def open_dashboard(port, env, shot_path, min_plots):
    """Load the env's page in headless Chromium; return what it shows, and the requests that failed or left."""
    from playwright.sync_api import sync_playwright
    base = f'http://127.0.0.1:{port}'
    seen = {'failed': [], 'external': [], 'errors': []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={'width': 1400, 'height': 1000})

            def route(r):
                if r.request.url.startswith(base):
                    r.continue_()
                else:  # the dashboard must not need the internet
                    seen['external'].append(r.request.url)
                    r.abort()
            page.route('**/*', route)
            page.on('requestfailed', lambda r: seen['failed'].append(f'{r.url} {r.failure}'))
            page.on('response', lambda r: r.status >= 400 and seen['failed'].append(f'{r.url} HTTP {r.status}'))
            page.on('pageerror', lambda e: seen['errors'].append(str(e)))
            page.on('console', lambda m: m.type == 'error' and seen['errors'].append(m.text))
            page.goto(f'{base}/env/{env}', wait_until='networkidle')
            page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {min_plots}",
                                   timeout=30000)
            page.wait_for_function("[...document.querySelectorAll('img')].some(i => i.complete && i.naturalWidth > 0)",
                                   timeout=30000)
            page.wait_for_timeout(500)  # let plotly finish drawing legends
            seen['libs'] = page.evaluate('[typeof Plotly.newPlot, typeof MathJax.Hub, typeof React.createElement, '
                                         'typeof jQuery]')
            seen['plots'] = page.locator('.js-plotly-plot').count()
            seen['titles'] = page.locator('.gtitle').all_text_contents()
            seen['legends'] = page.locator('.legendtext').all_text_contents()
            seen['lines'] = page.locator('.js-plotly-plot .scatterlayer .trace').count()
            seen['bars'] = page.locator('.js-plotly-plot .barlayer .trace').count()
            seen['heatmap'] = page.locator('.js-plotly-plot .heatmaplayer image, .js-plotly-plot .hm').count()
            seen['visible_titles'] = [t for t in seen['titles']
                                      if page.locator('.gtitle', has_text=t).first.is_visible()]
            page.screenshot(path=str(shot_path), full_page=True)
        finally:
            browser.close()
    return seen


def save_screenshot(shot):
    """With CSN_SAVE_SCREENSHOT=1, keep the screenshot of a real run as docs/visdom_dashboard.png."""
    if os.environ.get('CSN_SAVE_SCREENSHOT'):
        os.makedirs(os.path.join(REPO, 'docs'), exist_ok=True)
        shutil.copy(shot, os.path.join(REPO, 'docs', 'visdom_dashboard.png'))


def assert_dashboard_renders(seen, titles, legends):
    assert seen['external'] == [], 'the page asked for files outside the visdom server'
    assert seen['failed'] == [] and seen['errors'] == [], seen
    assert seen['libs'] == ['function', 'object', 'function', 'function']  # Plotly, MathJax, React, jQuery loaded
    assert set(titles) <= set(seen['visible_titles']), seen['titles']
    assert set(legends) <= set(seen['legends']), seen['legends']


@pytest.mark.skipif(chromium_path() is None, reason="no Chromium here (setup.sh installs Debian's chromium; or set "
                                                    "CHROMIUM=/path/to/chrome)")
@pytest.mark.slow
def test_dashboard_renders_in_headless_chromium(server, tmp_path):
    lg = loggers.VisdomLogger('http://127.0.0.1', server.port, 'browser', NOTIONS, out=io.StringIO())
    lg.log_triplets(fake_triplets())
    fill(lg, range(1, 4))
    seen = open_dashboard(server.port, 'browser', tmp_path / 'dashboard.png', min_plots=len(LINE_WINDOWS) + 2)
    assert seen['plots'] == len(LINE_WINDOWS) + 2  # the lines, the heatmap, the bars of epoch 1
    assert seen['lines'] == sum(len(v) for v in LINE_WINDOWS.values()) and seen['bars'] == len(NOTIONS)
    assert seen['heatmap'] >= 1
    titles = ['loss', 'triplet accuracy', 'val accuracy per notion', 'learning rate', 'embedding norm', 'mask norm',
              'training speed (triplets per second)', 'seconds per epoch',
              'masks, notion x embedding dimension (epoch 3)', 'masks stacked over notions (epoch 1)']
    assert_dashboard_renders(seen, titles, NOTIONS + ['train', 'val'])
    assert (tmp_path / 'dashboard.png').stat().st_size > 20000


# ---- main.py --visdom, end to end -------------------------------------------------------------------------------

@pytest.mark.slow
def test_main_with_visdom_plots_every_epoch_and_survives_the_server_dying(visdom_files, tmp_path):
    data = tmp_path / 'shapes'
    make_dataset(str(data))
    srv = Server(free_port(), str(tmp_path)).start()
    cmd = [sys.executable, os.path.join(REPO, 'main.py'), '--data', str(data), '--runs', str(tmp_path / 'runs'),
           '--name', 'e2e', '--epochs', '3', '--visdom', '--visdom-server', 'http://127.0.0.1', '--visdom-port',
           str(srv.port), '--tensorboard', *map(str, FAST)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    try:
        # wait for epoch 2's masks (its last plot), then pause training while we look
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if '(epoch 2)' in windows(srv.port, 'e2e')['masks']['title']:
                    break
            except Exception:  # noqa: BLE001 - no env or window yet
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGSTOP)
        wins = windows(srv.port, 'e2e')
        assert set(wins) == set(LINE_WINDOWS) | {'masks', 'masks_bar_0001', 'triplets'}
        for win in LINE_WINDOWS:
            for name, (x, _) in traces(wins[win]).items():
                assert x == [1, 2], (win, name, 'epoch 3 plotted before the test could stop training?')
        assert list(traces(wins['acc_per_notion'])) == ['colour', 'shape']
        assert wins['masks']['content']['data'][0]['y'] == ['colour', 'shape']
        if chromium_path() is not None:
            shot = tmp_path / 'e2e.png'
            seen = open_dashboard(srv.port, 'e2e', shot, min_plots=len(LINE_WINDOWS) + 2)
            assert_dashboard_renders(seen, ['loss', 'val accuracy per notion'], ['colour', 'shape', 'train', 'val'])
            save_screenshot(shot)
        srv.kill()  # the server dies mid-run: epoch 3 trains, logs to nobody, and the checkpoint is written
        proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
        srv.proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    out = stdout + stderr
    assert [ln for ln in out.splitlines() if 'visdom:' in ln and 'WARNING' in ln] == \
           [ln for ln in out.splitlines() if ln.startswith('visdom: WARNING: plotting failed (ConnectionError')]
    assert out.count('visdom: WARNING') == 1 and 'Traceback' not in out, out[-3000:]
    import torch
    assert torch.load(tmp_path / 'runs' / 'e2e' / 'checkpoint.pth.tar', weights_only=False)['epoch'] == 3
    assert os.listdir(tmp_path / 'runs' / 'e2e' / 'tensorboard')
