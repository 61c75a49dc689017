"""demo.py: the page in headless Chromium on a CSN trained on the coloured shapes (an upload, k images in the row of
every trained notion, rows that differ between notions, labels coloured against the query's, a file that is not an
image), its queries in this process, and its failures as one line `error: ...` with exit status 2.

CSN_DEMO_SCREENSHOT=PATH keeps the browser test's screenshot of the page at PATH:
    CSN_DEMO_SCREENSHOT=/tmp/demo.png .venv/bin/python -m pytest -q tests/test_demo.py -k chromium
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import requests

import demo
from conftest import (
    CHROMIUM_FLAGS,
    FAST,
    REPO,
    chromium_path,
    draw,
    error_line,
    in_process,
    make_dataset,
    save_checkpoint,
)
from csnlib.catalogue import CatalogueIndex

K = 5


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def trained(trained_run):
    """A CSN (fixed masks) trained one epoch on the shapes: (data folder, checkpoint, labels)."""
    r = trained_run('--epochs', 1, *FAST, name='csn')
    return r.data, str(r.run / 'model_best.pth.tar'), r.labels


def an_upload(tmp_path):
    """A blue square of another size and mode than the dataset's (palette, 90x50): model.transform's job."""
    path = tmp_path / 'my image.png'
    draw('blue', 'square', np.random.default_rng(5), size=50).resize((90, 50)).convert('P').save(path)
    return str(path)


# ------------------------------------------------------------------------------------------- failures

def test_no_checkpoint_is_one_line(tmp_path):
    line = error_line(in_process(demo.main, ['--resume', tmp_path / 'none.pth.tar', '--port', free_port()]))
    assert 'none.pth.tar' in line and 'no such checkpoint' in line


def test_a_port_in_use_is_one_line_before_anything_is_loaded(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        s.listen(1)
        port = s.getsockname()[1]
        line = error_line(in_process(demo.main, ['--resume', tmp_path / 'none.pth.tar', '--port', port]))
    assert f'--port {port}' in line and 'in use' in line and 'another --port' in line


@pytest.mark.slow
def test_a_dataset_of_other_notions_is_refused(trained, tmp_path):
    _, ckpt, _ = trained
    other = str(tmp_path / 'other')
    make_dataset(other)
    with open(os.path.join(other, 'dataset.json')) as f:
        meta = json.load(f)
    with open(os.path.join(other, 'dataset.json'), 'w') as f:
        json.dump({**meta, 'notions': ['shape', 'colour']}, f)  # the same names in another order: other masks
    line = error_line(in_process(demo.main, ['--resume', ckpt, '--data', other, '--port', free_port()]))
    assert "['colour', 'shape']" in line and "['shape', 'colour']" in line and '--data' in line


@pytest.mark.slow
@pytest.mark.parametrize('gone', ['images', 'files'])
def test_a_data_folder_without_its_images_is_refused(trained, tmp_path, gone):
    data, ckpt, _ = trained
    copy = str(tmp_path / 'copy')
    shutil.copytree(data, copy)
    shutil.rmtree(os.path.join(copy, 'images') if gone == 'images' else os.path.join(copy, 'images', 'shapes'))
    line = error_line(in_process(demo.main, ['--resume', ckpt, '--data', copy, '--port', free_port()]))
    assert os.path.join(copy, 'images') in line and 'get_data.py' in line
    assert gone == 'images' or 'the 40 images listed' in line


# ------------------------------------------------------------------------------------------- queries in this process

@pytest.fixture(scope='module')
def page_model(trained):
    data, ckpt, _ = trained
    return demo.load_demo(demo.build_parser().parse_args(['--resume', ckpt, '--device', 'cpu']))


def items(row):
    """The image indices of a row's figures, in order."""
    return [int(part.split('"', 1)[0]) for part in row.split('data-index="')[1:]]


@pytest.mark.slow
def test_queries_by_image_name_and_upload_agree_with_the_indexes(page_model, trained, tmp_path):
    data, _, labels = trained
    m = page_model
    assert m.conditions == [0, 1] and isinstance(m.index, CatalogueIndex)  # one index for both notions' rows
    q = m.query_of_image(7)
    assert m.query_of_name('7')['exclude'] == 7 and m.query_of_name(m.info.filenames[7])['exclude'] == 7
    _, rows = m.answer(q, K)
    for c, row in zip(m.conditions, rows):
        got = items(row)
        space = m.index.vectors[:, :m.index.dim] * m.masks[c]  # (N, D) masked
        d = np.linalg.norm(space - space[7], axis=1)
        d[7] = np.inf  # the query is not its own neighbour
        assert got == [int(j) for j in np.argsort(d, kind='stable')[:K]]  # the search, against a full sort
        name = m.notions[c]
        same = [part.split('"', 1)[0] == '1' for part in row.split('data-same="')[1:]]
        assert same == [labels[j][name] == labels[7][name] for j in got]  # green exactly where the label is the query's
    # a file of the dataset uploaded is prepared as the dataset's own copy was: it finds that copy first, at a
    # distance of the precision the model embeds in (bf16 autocast where the CPU has it), and nothing is left out
    up = m.query_of_upload(m.info.image_path(7))
    assert up['exclude'] is None and up['labels'] == {}
    for c in m.conditions:
        idx, dist = m.index.search(up['vectors'][c], 2, c)
        assert idx[0, 0] == 7 and dist[0, 0] < 0.05 < dist[0, 1], (c, idx, dist)
    assert m.answer(m.query_of_upload(an_upload(tmp_path)), 3)[1][0].count('<img') == 3


@pytest.mark.parametrize('variant, conditions', [(['--learned'], (0, 1)), (['--model', 'triplet'], (0, 1)),
                                                 (['--model', 'task'], (1,))])
def test_every_model_gets_one_row_per_trained_notion(tmp_path, variant, conditions):
    data = str(tmp_path / 'shapes')
    make_dataset(data)
    os.makedirs(tmp_path / 'run')
    ckpt = save_checkpoint(tmp_path / 'run' / 'checkpoint.pth.tar', variant, conditions=conditions)  # untrained
    a = demo.build_parser().parse_args(['--resume', ckpt, '--data', data, '--device', 'cpu'])
    m = demo.load_demo(a)
    assert m.conditions == list(conditions) and os.path.exists(tmp_path / 'run' / 'embeddings.npy')  # cached there
    _, rows = m.answer(m.query_of_upload(an_upload(tmp_path)), 4)
    assert [len(set(items(r))) for r in rows] == [4] * len(conditions)
    assert (m.masks_picture() is not None) == (variant == ['--learned'])
    assert ('not trained: colour' in m.card()) == (conditions == (1,))
    page = demo.build_page(m, a)  # a notion the checkpoint did not train gets no row
    assert sorted(b.elem_id for b in page.blocks.values() if (b.elem_id or '').startswith('notion-')) == \
        [f'notion-{c}' for c in conditions]


@pytest.mark.slow
def test_a_file_that_is_not_an_image_or_a_bad_name_says_so(page_model, tmp_path):
    (tmp_path / 'notes.txt').write_text('not an image\n')
    with pytest.raises(demo.UserError, match=r'^notes.txt is not an image \(PIL cannot read it\): upload a PNG'):
        page_model.query_of_upload(str(tmp_path / 'notes.txt'))
    for bad in ('40', '-1', 'shapes/nothing.png'):
        with pytest.raises(demo.UserError, match='neither an image index'):
            page_model.query_of_name(bad)


# ------------------------------------------------------------------------------------------- the page in Chromium

def start_demo(ckpt, port):
    """python demo.py as a user runs it, until its page answers: the process."""
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'demo.py'), '--resume', ckpt, '--port', str(port),
                             '--k', str(K), '--device', 'cpu'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if requests.get(f'http://127.0.0.1:{port}/', timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f'demo.py did not serve its page (exit {proc.returncode})\n{out[-2000:]}\n{err[-3000:]}')


def rows_of(page, conditions):
    return [[int(i) for i in page.locator(f'#notion-{c} .csn-item').evaluate_all(
        'els => els.map(e => e.dataset.index)')] for c in conditions]


def wait_rows(page, conditions, k):
    page.wait_for_function('([ids, k]) => ids.every(c => document.querySelectorAll(`#notion-${c} .csn-item img`)'
                           '.length === k && [...document.querySelectorAll(`#notion-${c} .csn-item img`)]'
                           '.every(i => i.complete && i.naturalWidth > 0))', arg=[conditions, k], timeout=30000)


@pytest.mark.skipif(chromium_path() is None, reason="no Chromium here (setup.sh installs Debian's chromium; or set "
                                                    "CHROMIUM=/path/to/chrome)")
@pytest.mark.slow
def test_the_page_in_chromium_shows_k_neighbours_per_trained_notion(trained, tmp_path):
    from playwright.sync_api import sync_playwright
    data, ckpt, labels = trained
    port = free_port()
    base = f'http://127.0.0.1:{port}'
    proc = start_demo(ckpt, port)
    seen = {'external': [], 'errors': []}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport={'width': 1400, 'height': 1000})

                def route(r):
                    if r.request.url.startswith((base, 'data:', 'blob:')):
                        r.continue_()
                    else:  # the page must not need the internet
                        seen['external'].append(r.request.url)
                        r.abort()
                page.route('**/*', route)
                page.on('pageerror', lambda e: seen['errors'].append(str(e)))
                page.goto(base, wait_until='load')
                wait_rows(page, [0, 1], K)  # the first test image, queried when the page opens
                status = page.locator('#status')
                assert 'query' in status.inner_text() and 'image ' in status.inner_text()
                assert 'colour' in page.locator('#model-card').inner_text()
                assert page.locator('#masks img').count() == 1 and page.locator('#sample img').count() == 10

                # an upload of any size and mode: every trained notion's row shows K images, and the rows differ
                page.set_input_files('#upload input[type=file]', an_upload(tmp_path))
                page.wait_for_function("document.querySelector('#status').innerText.includes('my image.png')",
                                       timeout=30000)
                wait_rows(page, [0, 1], K)
                rows = rows_of(page, [0, 1])
                assert all(len(r) == K and len(set(r)) == K for r in rows) and rows[0] != rows[1], rows

                # the slider: K -> 3 neighbours, answered well under a second
                box = page.locator('#k input[type=number]')
                box.fill('3')
                box.press('Enter')
                wait_rows(page, [0, 1], 3)
                assert rows_of(page, [0, 1]) == [r[:3] for r in rows]
                assert int(page.locator('#answer-ms').inner_text()) < 1000

                # a click on a test image: its labels, green and red against them
                page.locator('#sample .thumbnail-item').nth(2).click()
                page.wait_for_function("!document.querySelector('#status').innerText.includes('my image.png')",
                                       timeout=30000)
                wait_rows(page, [0, 1], 3)
                q = int(status.inner_text().split('image ', 1)[1].split()[0])
                for c, name in enumerate(('colour', 'shape')):
                    same = page.locator(f'#notion-{c} .csn-item').evaluate_all('els => els.map(e => e.dataset.same)')
                    assert same == [str(int(labels[j][name] == labels[q][name])) for j in rows_of(page, [c])[0]]

                # a file that is not an image: a message in the page, the rows left as they were
                shown = rows_of(page, [0, 1])
                (tmp_path / 'notes.txt').write_text('not an image\n')
                page.locator('#upload button[aria-label="Clear"]').click()
                page.set_input_files('#upload input[type=file]', str(tmp_path / 'notes.txt'))
                page.wait_for_function("document.querySelector('#status').innerText.includes('error:')", timeout=30000)
                assert 'notes.txt is not an image' in status.inner_text()
                assert rows_of(page, [0, 1]) == shown and 'Traceback' not in page.locator('body').inner_text()
                if os.environ.get('CSN_DEMO_SCREENSHOT'):
                    page.screenshot(path=os.environ['CSN_DEMO_SCREENSHOT'], full_page=True)
            finally:
                browser.close()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert seen == {'external': [], 'errors': []}
    assert 'Traceback' not in out + err and f'open http://127.0.0.1:{port}' in out, out + err
