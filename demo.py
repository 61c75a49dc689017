"""Look at a trained model in the browser: click a test image (or upload one, or name one) and see its nearest images
of the dataset under each notion the model was trained on, one row per notion, with the masks and test accuracies.

    python demo.py --resume runs/fonts_quick/model_best.pth.tar            then open http://127.0.0.1:7860
    python demo.py --resume runs/csn/model_best.pth.tar --data data/fonts --port 7861

A local Gradio page (any --model of main.py): no analytics, nothing fetched from the internet, listening on 127.0.0.1
unless --host says otherwise; from another machine, `ssh -L 7860:127.0.0.1:7860 HOST` and open the same address. The
dataset's embeddings come from the cache next to the checkpoint (computed at the first start, with a progress bar),
so a query costs one image's embedding at most and a search.
"""
import argparse
import base64
import errno
import functools
import html
import io
import json
import math
import os
import re
import socket
import sys
import time

import numpy as np
from PIL import Image

from csnlib.catalogue import CatalogueIndex
from csnlib.checkpoint import describe
from csnlib.errors import DataError, UserError, run_script
from csnlib.options import add_device_flag, int_range, port
from csnlib.pictures import plot_masks, short
from csnlib.runtime import keep_freed_memory
from csnlib.search import dataset_embeddings, test_images
from csnlib.trained_csn import check_notions, load_trained
from triplet_image_loader import (
    MAX_IMAGE_SIDE,
    ImageTooLarge,
    check_image_size,
    load_dataset_info,
    load_image,
    missing_images,
    read_labels,
)

GRADIO = 'gradio==6.31.0'  # the version requirements-dev.txt pins
GREEN, RED, GREY = '#1a7f37', '#cf222e', '#6e7781'
FONTS = ['ui-sans-serif', 'system-ui', 'sans-serif']  # the system's own: nothing to fetch
MONO = ['ui-monospace', 'Consolas', 'monospace']
QUERY_SIZE = 160  # the query as the model crops it, drawn at this size
MAX_UPLOAD = '20mb'  # the largest file the page accepts (Gradio refuses a larger one before it is stored)


def build_parser():
    p = argparse.ArgumentParser(description='A local web page of a trained model: the nearest images of a query under '
                                            'each trained notion, one row per notion, with its masks '
                                            'and test accuracy.',
                                allow_abbrev=False)
    a = p.add_argument
    a('--resume', required=True, metavar='CKPT', help='checkpoint of main.py, any --model (e.g. '
                                                      'runs/NAME/model_best.pth.tar)')
    a('--data', default=None, metavar='DIR', help='dataset folder (default: the one the checkpoint was trained on)')
    a('--port', type=port, default=7860, help='port of the page (default: 7860)')
    a('--host', default='127.0.0.1', help='address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 '
                                          'opens the page to the network)')
    a('--k', type=int_range(1, 50), default=8,
      help='neighbours per notion at the start; a slider changes it (default: 8)')
    a('--sample', type=int_range(1, 200), default=24, help='test images offered to click on (default: 24)')
    add_device_flag(p, help='device that embeds the dataset and the uploads (default: auto = CUDA, then MPS, then CPU)')
    return p


def check_port(host, port):
    """Refuse an address that cannot be listened on (a port in use), before minutes of embedding."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except (OSError, UnicodeError) as e:
        raise UserError(f'--host {host}: not an address of this machine ({getattr(e, "strerror", None) or e}); the '
                        f'default --host 127.0.0.1 always works') from None
    if family == socket.AF_INET6:  # Gradio builds its own URL from the host and cannot with an IPv6 address
        raise UserError(f'--host {host}: an IPv6 address; the page server takes an IPv4 address or name (--host '
                        f'127.0.0.1, this machine only, or 0.0.0.0, every IPv4 interface)')
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own socket
            s.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f'--port {port}: the port is in use on {host} (another program, or a demo already '
                            f'running): pass another --port, or stop that program') from None
        raise UserError(f'--host {host} --port {port}: cannot listen there ({e.strerror or e}); the default --host '
                        f'127.0.0.1 always works') from None


def check_images(info):
    """A dataset folder whose images are there: DataError naming the folder otherwise."""
    names = os.path.join(info.root, 'filenames.json')
    if not info.filenames:
        raise DataError(f'{names} lists no images: nothing to search; build the dataset with get_data.py')
    missing = missing_images(info)
    if missing:
        raise DataError(f'{len(missing)} of the {len(info.filenames)} images listed in {names} are not in '
                        f'{info.images_dir} (e.g. {missing[0]}): build the dataset again with get_data.py, or point '
                        f'--data at the folder that holds its images')


def read_test_results(checkpoint):
    """test_results.json next to the checkpoint (main.py --test), or None."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(checkpoint)), 'test_results.json')) as f:
            res = json.load(f)
    except (OSError, ValueError):
        return None
    return res if isinstance(res, dict) and isinstance(res.get('per_notion'), dict) else None


def number(x):
    """x when it is a finite number from a file (not a bool), else None."""
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return x if ok else None


def cell(text):
    """Text from a file, shown as itself in the page's markdown: HTML escaped, markdown's table and code marks too."""
    return html.escape(str(text)).replace('|', '&#124;').replace('`', '&#96;').replace('*', '&#42;') \
        .replace('_', '&#95;').replace('[', '&#91;')


def image_uri(u8):
    """(S, S, 3) uint8 -> a data: URI of a PNG, for an <img> in the page."""
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format='PNG')
    return 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode()


class Demo:
    """The model, the dataset's embeddings and one search index for every trained notion (one per notion for
    task-specific networks and ASEN): queries in, rows of HTML out."""

    def __init__(self, trained, ckpt, rt, info, emb, masks, checkpoint):
        self.trained, self.info, self.args, self.checkpoint = trained, info, rt.args, checkpoint
        self.notions, self.conditions = info.notions, trained.conditions
        self.masks, self.epoch = masks, ckpt.get('epoch')
        self.labels = read_labels(info) or {}
        self.results = read_test_results(checkpoint)
        self.index = trained.index(emb)  # one build answers every notion's row (csnlib.catalogue)
        self.size = min(max(trained.image_size, 64), 128)  # thumbnails: the model's crop, at least 64 px
        self.thumb = functools.lru_cache(maxsize=4096)(self._thumb)
        try:
            self.pool = test_images(info, rt.args, log=lambda *a, **k: None)  # the test split's images
        except DataError:
            self.pool = np.arange(len(info.filenames))  # no test triplets: any image

    # ------------------------------------------------------------------------------------------- the queries

    def _thumb(self, i):
        return load_image(self.info.image_path(i), self.size)  # (S, S, 3) uint8

    def sample(self, n, rng):
        return sorted(int(i) for i in rng.choice(self.pool, min(n, len(self.pool)), replace=False))

    def image_labels(self, i):
        return {name: lab[i] for name, lab in self.labels.items() if lab[i]}

    def query_of_image(self, i):
        """Image i of the dataset as a query: its raw embeddings come from the index, and it is left out."""
        return {'vectors': {c: self.index.row(i, c) for c in self.conditions}, 'exclude': i,
                'image': load_image(self.info.image_path(i), QUERY_SIZE),
                'labels': self.image_labels(i), 'what': f'image {i} `{self.info.filenames[i]}`'}

    def query_of_name(self, text):
        """An image index (a row of filenames.json) or a path listed there."""
        text, n = (text or '').strip(), len(self.info.filenames)
        if re.fullmatch(r'[0-9]{1,18}', text) and int(text) < n:  # ASCII digits only: '²' is a digit to str.isdigit
            return self.query_of_image(int(text))
        if text in self.info.filenames:
            return self.query_of_image(self.info.filenames.index(text))
        shown = repr(text) if len(text) <= 80 else f'{text[:40]!r}... ({len(text)} characters)'
        raise UserError(f'{shown} is neither an image index (0 to {n - 1}) nor a path listed in '
                        f'{os.path.join(self.info.root, "filenames.json")}; upload the file to query with it')

    def query_of_upload(self, path):
        """Any image file, prepared as model.transform prepares it (RGB, shorter side to S, centre crop)."""
        name = os.path.basename(path)
        try:
            with Image.open(path) as im:
                what = f'{im.width}x{im.height} {im.mode}'
                check_image_size(im, name)  # from its header, before anything is decoded
            x = self.trained.transform(path)  # (3, S, S)
        except ImageTooLarge as e:
            raise UserError(str(e)) from None
        except (OSError, ValueError, SyntaxError, DataError, Image.DecompressionBombError) as e:
            reason = 'too large' if isinstance(e, Image.DecompressionBombError) else 'PIL cannot read it'
            raise UserError(f'{name} is not an image ({reason}): upload a PNG, JPEG, WebP, GIF or BMP file') from None
        s = self.trained.image_size
        raw = self.trained.embed(x).cpu().numpy()  # (1, D): one forward pass for every notion; (C, 1, D) per notion
        vectors = {c: (raw[c] if raw.ndim == 3 else raw)[0] for c in self.conditions}  # (D,) raw, per notion
        return {'vectors': vectors, 'exclude': None, 'image': load_image(path, QUERY_SIZE), 'labels': {},
                'what': f'uploaded {html.escape(name)} ({what}, seen by the model as {s}x{s} RGB)'}

    def answer(self, q, k, t0=None):
        """(status markdown, one HTML row per trained notion) of the k nearest images of query q under each notion;
        t0: when the query came (perf_counter), for the time it took in all."""
        t0 = time.perf_counter() if t0 is None else t0
        rows, search_s = [], 0.0
        for c in self.conditions:
            t1 = time.perf_counter()
            idx, dist = self.index.search(q['vectors'][c], int(k), c, q['exclude'])
            search_s += time.perf_counter() - t1
            rows.append(self.row(c, idx[0], dist[0], q['labels'].get(self.notions[c], '')))
        labels = ', '.join(f'{n} **{html.escape(v)}**' for n, v in q['labels'].items())
        status = (f'**query**: {q["what"]}' + (f' · {labels}' if labels else '') +
                  f'\n\n{int(k)} nearest of {len(self.info.filenames)} images per notion · search '
                  f'{search_s * 1e3:.1f} ms · answered in <span id="answer-ms">{(time.perf_counter() - t0) * 1e3:.0f}'
                  f'</span> ms')
        return status, rows

    def row(self, c, idx, dist, q_label):
        name = self.notions[c]
        lab = self.labels.get(name)
        head = [f'<b style="font-size:1.1em">{html.escape(name)}</b>']
        acc = number((self.results or {}).get('per_notion', {}).get(name))
        if acc is not None:
            head.append(f'test accuracy {acc * 100:.1f} %')
        if lab and q_label:
            head.append(f'<span style="color:{GREEN}">green</span>: the query\'s {html.escape(name)} '
                        f'({html.escape(q_label)}), <span style="color:{RED}">red</span>: another')
        items = []
        for j, d in zip(idx.tolist(), dist.tolist()):
            l = lab[j] if lab else ''
            colour = GREY if not (l and q_label) else GREEN if l == q_label else RED
            caption = f'#{j}<br>d {d:.3f}' + (f'<br><span style="color:{colour};font-weight:600">'
                                              f'{html.escape(short(l, 14))}</span>' if l else '')
            items.append(f'<figure class="csn-item" data-index="{j}" data-same="{int(colour == GREEN)}" '
                         f'title="{html.escape(self.info.filenames[j])}" style="margin:0;text-align:center;'
                         f'font-size:12px;line-height:1.25">'
                         f'<img src="{image_uri(self.thumb(j))}" alt="image {j}" width="72" height="72" '
                         f'style="border:3px solid {colour};border-radius:4px;image-rendering:pixelated">'
                         f'<figcaption>{caption}</figcaption></figure>')
        return (f'<div class="csn-row" data-notion="{html.escape(name)}" style="padding:4px 0">'
                f'<div style="margin-bottom:4px">{" · ".join(head)}</div>'
                f'<div style="display:flex;flex-wrap:wrap;gap:8px">{"".join(items)}</div></div>')

    # ------------------------------------------------------------------------------------------- the model

    def card(self):
        """The checkpoint, its notions, image size, search and test accuracy, as markdown."""
        trained = [self.notions[c] for c in self.conditions]
        others = [n for n in self.notions if n not in trained]
        faiss, one = self.index.faiss is not None, isinstance(self.index, CatalogueIndex)
        epoch = number(self.epoch)
        lines = [f'- **checkpoint** {cell(self.checkpoint)}' + (f' (epoch {epoch:.0f})' if epoch else ''),
                 f'- **model** {cell(describe(self.args))}',
                 f'- **notions** {cell(", ".join(trained))}' +
                 (f' (not trained: {cell(", ".join(others))})' if others else ''),
                 f'- **image size** {self.trained.image_size} x {self.trained.image_size} px',
                 f'- **dataset** {cell(self.info.root)}: {len(self.info.filenames)} images' +
                 (f', labels of {cell(", ".join(self.labels))}' if self.labels else ', no labels'),
                 f'- **search** exact, {"faiss" if faiss else "numpy"}, ' +
                 ('one index for every notion over [f(x); |m_c f(x)|²]' if one else 'one index per notion')]
        res = self.results
        if res:  # test_results.json is data: its text is escaped, its numbers are numbers or left out
            maps = res.get('mAP_per_notion') if isinstance(res.get('mAP_per_notion'), dict) else {}
            triplets = number(res.get('triplets'))
            lines += ['', f'test results (`test_results.json` of '
                          f'{cell(os.path.basename(str(res.get("checkpoint", ""))))}'
                          f', {"?" if triplets is None else f"{triplets:.0f}"} triplets):', '',
                      '| notion | test accuracy | retrieval mAP |', '| --- | ---: | ---: |']
            for name, acc in [*res['per_notion'].items(), ('all', res.get('accuracy'))]:
                m, acc = number(maps.get(name) if name != 'all' else res.get('mAP')), number(acc)
                if acc is not None:
                    lines.append(f'| {cell(name)} | {acc * 100:.2f} % | {"" if m is None else format(m, ".3f")} |')
        else:
            lines += ['', f'no test results: `python main.py --test --resume {self.checkpoint}` writes them']
        return '\n'.join(lines)

    def masks_picture(self):
        """The masks as plot_masks draws them (notion x dimension), a PIL image; None for models without masks."""
        if self.trained.net.mask_weights() is None:
            return None
        buf = io.BytesIO()
        names = [n if c in self.conditions else f'{n} (not trained)' for c, n in enumerate(self.notions)]
        plot_masks(self.masks, names, buf, f'masks of {describe(self.args)}')
        buf.seek(0)
        return Image.open(buf).convert('RGB')


def import_gradio():
    os.environ['GRADIO_ANALYTICS_ENABLED'] = 'False'  # read by gradio at import; Blocks(analytics_enabled=False) too
    try:
        import gradio as gr
    except ImportError:
        raise UserError(f'demo.py needs gradio: pip install {GRADIO} (bash setup.sh installs it with the development '
                        f'packages of requirements-dev.txt)') from None
    return gr


def load_demo(a):
    """Everything the page shows, checked and embedded before the server starts."""
    trained, ckpt, rt = load_trained(a.resume, device=a.device, amp=None, data=a.data)
    info = load_dataset_info(rt.args.data)
    check_notions(ckpt, info, a.resume)
    check_images(info)
    import_gradio()  # missing: say so now, not after minutes of embedding
    keep_freed_memory(rt.args, rt.device)
    emb, masks = dataset_embeddings(trained.model, info, rt)
    return Demo(trained, ckpt, rt, info, emb, masks, a.resume)


def build_page(demo, a):
    gr = import_gradio()
    n = len(demo.info.filenames)
    k_max = max(1, min(50, n - 1))

    def respond(make_query, k):
        """The page's answer to a query: (state, query picture, status, rows). The user's mistakes (a file that is not
        an image) become a message in the page, the rest stays; no query yet (None) changes nothing."""
        keep, t0 = [gr.skip()] * len(demo.conditions), time.perf_counter()
        try:
            q = make_query()
        except UserError as e:
            return (gr.skip(), gr.skip(), f'**error:** {html.escape(str(e))}', *keep)
        if q is None:
            return (gr.skip(), gr.skip(), gr.skip(), *keep)
        status, rows = demo.answer(q, k, t0)
        return (q, q['image'], status, *rows)

    def gallery(sample):
        return [(demo.thumb(i), str(i)) for i in sample]

    def new_sample():
        sample = demo.sample(a.sample, np.random.default_rng())
        return sample, gallery(sample)

    first = demo.sample(a.sample, np.random.default_rng(0))
    title = f'{describe(demo.args)} on {demo.info.name}'
    with gr.Blocks(title=f'CSN demo: {title}', analytics_enabled=False) as page:
        gr.Markdown(f'## Conditional Similarity Network: {html.escape(title)}\nThe nearest images of a query under '
                    f'each notion the model was trained on, one row per notion (distance d under that notion\'s mask).')
        query, sample = gr.State(None), gr.State(first)
        with gr.Row():
            with gr.Column(scale=1, min_width=220):
                query_image = gr.Image(label='query (as the model crops it)', interactive=False, height=200,
                                       elem_id='query-image', buttons=[])
                status = gr.Markdown('loading...', elem_id='status')
            with gr.Column(scale=4):
                pictures = gr.Gallery(gallery(first), label='click a test image', columns=8, height='auto',
                                      allow_preview=False, object_fit='contain', format='png', elem_id='sample',
                                      buttons=[])
                with gr.Row(equal_height=True):
                    upload = gr.File(label=f'or upload an image (any mode, up to {MAX_UPLOAD.upper()}, '
                                           f'{MAX_IMAGE_SIDE:,} px a side)', type='filepath', height=110,
                                     elem_id='upload')
                    with gr.Column():
                        by_name = gr.Textbox(label='or an image index / a path of filenames.json (Enter)',
                                             elem_id='by-name', max_lines=1)
                        k = gr.Slider(1, k_max, value=min(a.k, k_max), step=1, label='k: neighbours per notion',
                                      elem_id='k')
                    again = gr.Button('another sample', size='sm', scale=0, min_width=120)
        rows = [gr.HTML(elem_id=f'notion-{c}') for c in demo.conditions]
        with gr.Accordion('the model', open=True):
            with gr.Row():
                with gr.Column(scale=2, min_width=440):
                    gr.Markdown(demo.card(), elem_id='model-card')
                with gr.Column(scale=3):
                    masks = demo.masks_picture()
                    if masks is not None:
                        gr.Image(masks, label='masks m_c: notion x embedding dimension', show_label=False,
                                 interactive=False, elem_id='masks', buttons=[])
                    else:
                        gr.Markdown(f'{describe(demo.args)}: no masks (one embedding for every notion, or one network '
                                    f'per notion)')
        out = [query, query_image, status, *rows]

        def picked(sample, k, evt: gr.SelectData):  # gradio passes the click as evt, by this annotation
            return respond(lambda: demo.query_of_image(sample[evt.index]), k)

        page.load(lambda k: respond(lambda: demo.query_of_image(first[0]), k), [k], out)
        pictures.select(picked, [sample, k], out)
        upload.upload(lambda path, k: respond(lambda: demo.query_of_upload(path), k), [upload, k], out)
        by_name.submit(lambda text, k: respond(lambda: demo.query_of_name(text), k), [by_name, k], out)
        k.change(lambda q, k: respond(lambda: q, k), [query, k], out)
        again.click(new_sample, None, [sample, pictures])
    return page


def serve(page, demo, a):
    gr = import_gradio()
    theme = gr.themes.Default(font=FONTS, font_mono=MONO)
    try:
        _, url, _ = page.launch(server_name=a.host, server_port=a.port, share=False, inbrowser=False, quiet=True,
                                prevent_thread_lock=True, show_error=False, footer_links=[], enable_monitoring=False,
                                ssr_mode=False, pwa=False, mcp_server=False, theme=theme, max_file_size=MAX_UPLOAD)
    except OSError as e:
        raise UserError(f'--port {a.port}: cannot serve on {a.host}:{a.port} ({e}): pass another --port') from None
    hint = (f'; from another machine: ssh -L {a.port}:127.0.0.1:{a.port} HOST, then open http://127.0.0.1:{a.port}'
            if a.host in ('127.0.0.1', 'localhost') else '')
    print(f'demo of {describe(demo.args)} on {len(demo.info.filenames)} images of {demo.info.root}: open {url} '
          f'(Ctrl-C stops it){hint}', flush=True)
    page.block_thread()


def main(argv=None):
    a = build_parser().parse_args(argv)
    check_port(a.host, a.port)
    demo = load_demo(a)
    serve(build_page(demo, a), demo, a)
    return 0


if __name__ == '__main__':
    sys.exit(run_script(main))
