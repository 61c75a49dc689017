"""zappos.py against a local HTTP server serving tiny stand-ins of the three Zappos50k archives."""
import csv
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import scipy.io
from PIL import Image

import get_data
from conftest import REPO, error_line
from csnlib import dataset_writer, zappos
from csnlib.errors import GetDataError
from triplet_image_loader import check_triplet_file, load_dataset_info, load_triplets, missing_images, read_labels

NOTIONS = ['class', 'closure', 'gender', 'heel']
SPLITS = ['train', 'val', 'test']
# (brand folder as image-path.mat lists it, as the images zip spells it): UT-Zap50K's real differences, a trailing
# period dropped on disk and Levi's with its (R) as an HTML entity, and folders spelled alike, a period kept in both
FOLDERS = [('Shoes/Oxfords/Neil M.', 'Shoes/Oxfords/Neil M'), ('Boots/Ankle/T.U.K.', 'Boots/Ankle/T.U.K'),
           ('Sandals/Flat/W.A.G.', 'Sandals/Flat/W.A.G'), ('Shoes/Heels/L.A.M.B.', 'Shoes/Heels/L.A.M.B'),
           ("Shoes/Sneakers and Athletic Shoes/Levi's Kids", "Shoes/Sneakers and Athletic Shoes/Levi's&#174; Kids"),
           ('Boots/Mid-Calf/Aquatalia by Marvin K.', 'Boots/Mid-Calf/Aquatalia by Marvin K'),
           ('Boots/Ankle/A. Testoni', 'Boots/Ankle/A. Testoni'),
           ('Slippers/Slipper Flats/X.', 'Slippers/Slipper Flats/X.')]
MOVED = 13                          # an image in another folder on disk than listed: found by its file name alone
HEELS = ['Flat', 'Under 1in', '1in - 1 3/4in', '2in - 2 3/4in', '3in - 3 3/4in', '4in - 4 3/4in', '5in & over']
N_IMAGES = 48
SMALL = ['--train-triplets', '40', '--val-triplets', '10', '--test-triplets', '10', '--split', '0.5,0.25,0.25']


# ------------------------------------------------------------------------------------------- the archives

def jpeg(i):
    buf = io.BytesIO()
    Image.new('RGB', (8, 8), (i * 5 % 256, 100, 200)).save(buf, 'JPEG')
    return buf.getvalue()


def image_paths():
    """The images as the images zip holds them."""
    folder = lambda i: FOLDERS[i % 8][1] if i != MOVED else FOLDERS[i % 8][1].rsplit('/', 1)[0] + '/Another Brand'
    return [f'{folder(i)}/{1000 + i}.{i * 7}.jpg' for i in range(N_IMAGES)]


def listed_paths():
    """The same images as image-path.mat lists them."""
    return [f'{FOLDERS[i % 8][0]}/{1000 + i}.{i * 7}.jpg' for i in range(N_IMAGES)]


def make_zip(path, members):
    """members: [(name, bytes)]; a name ending in / is a folder entry."""
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            z.writestr(name, data)
    return path


def metadata_rows():
    """(image path, meta-data.csv row) per product; the last two rows name no usable image."""
    rows = []
    for i, p in enumerate(listed_paths()):
        closure = 'Buckle;Zipper' if i == 11 else ['Lace up', 'Buckle', 'Slip-On'][i % 3]
        gender = 'Men;Women' if i == 5 else ['Men', 'Women'][(i // 4) % 2]
        heel = '' if i == 7 else HEELS[i % 7]
        rows.append((p, [f'{1000 + i}-{i * 7}', p.split('/')[0], p.split('/')[1], heel, 'Padded', closure, gender,
                         'Leather,Rubber', 'Round']))
    rows.append((f'{FOLDERS[0][0]}/not-in-the-images-zip.jpg', ['1-1', 'Shoes', 'Oxfords', 'Flat', '', 'Lace up',
                                                               'Men', '', '']))
    rows.append(('', ['2-2', 'Shoes', 'Oxfords', 'Flat', '', 'Lace up', 'Men', '', '']))
    return rows


def write_metadata(folder, variable='imagepath', rows=None):
    rows = rows or metadata_rows()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'meta-data.csv'), 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['CID', 'Category', 'SubCategory', 'HeelHeight', 'Insole', 'Closure', 'Gender', 'Material',
                    'ToeStyle'])
        w.writerows(r for _, r in rows)
    scipy.io.savemat(os.path.join(folder, 'image-path.mat'),
                     {variable: np.array([p for p, _ in rows], dtype=object).reshape(-1, 1)})


@pytest.fixture(scope='module')
def archives(tmp_path_factory):
    d = tmp_path_factory.mktemp('archives')
    paths = image_paths()
    folders = sorted({f'ut-zap50k-images/{p.rsplit("/", 1)[0]}/' for p in paths})
    make_zip(d / 'ut-zap50k-images.zip', [('ut-zap50k-images/', b'')] + [(f, b'') for f in folders]
             + [(f'ut-zap50k-images/{p}', jpeg(i)) for i, p in enumerate(paths)])
    order = list(np.random.default_rng(0).permutation(N_IMAGES))                 # the paper's own image order
    names = '\n'.join(paths[i] for i in order) + '\n'
    lists = {f'tripletlists/{n}_tripletlist_{s}.txt': ''.join(f'{k} {k + 1} {k + 2}\n' for k in range(0, 30, 3))
             for n in NOTIONS for s in SPLITS}
    top = 'csn_zappos_triplets/'
    make_zip(d / 'csn_zappos_triplets.zip', [(top, b''), (top + 'filenames.json', names)]
             + [(top + k, v) for k, v in lists.items()])
    (d / 'flat').mkdir()
    make_zip(d / 'flat' / 'csn_zappos_triplets.zip', [('filenames.json', names)] + list(lists.items()))  # no top folder
    write_metadata(d / 'meta' / 'ut-zap50k-data')
    make_zip(d / 'ut-zap50k-data.zip', [(f'ut-zap50k-data/{f}', (d / 'meta' / 'ut-zap50k-data' / f).read_bytes())
                                        for f in ('meta-data.csv', 'image-path.mat')])
    return {'dir': d, 'names': names, 'lists': lists}


# --------------------------------------------------------------------------------------------- the server

class Handler(BaseHTTPRequestHandler):
    """GET with Range; per path: a status to answer, bytes to serve once, a cut after N bytes the first time."""

    def do_GET(self):
        st = self.server.state
        st['requests'].append((self.path, self.headers.get('Range')))
        if self.path in st['status']:
            self.send_error(st['status'][self.path])
            return
        data = st['once'].pop(self.path, None) or st['files'].get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, rng = 0, self.headers.get('Range')
        if rng and not st['ignore_range']:
            start = int(re.match(r'bytes=(\d+)-$', rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header('Content-Range', f'bytes */{len(data)}')
                self.send_header('Content-Length', '0')
                self.end_headers()
                return
            self.send_response(206)
            self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        cut = st['cut'].pop(self.path, None)
        self.wfile.write(body[:cut] if cut is not None else body)         # HTTP/1.0: the connection closes after

    def log_message(self, *args):
        pass


@pytest.fixture
def server(archives):
    srv = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    srv.state = {'requests': [], 'status': {}, 'once': {}, 'cut': {}, 'ignore_range': False,
                 'files': {'/' + f.name: f.read_bytes() for f in archives['dir'].glob('*.zip')}}
    thread = threading.Thread(target=srv.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    srv.url = lambda name: f'http://127.0.0.1:{srv.server_address[1]}/{name}'
    yield srv
    srv.shutdown()
    srv.server_close()


def closed_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def flags(out, url, *extra):
    """get_data.py arguments with every URL from url(name) and quick retries."""
    return ['--out', str(out), '--images-url', url('ut-zap50k-images.zip'),
            '--triplets-url', url('csn_zappos_triplets.zip'), '--metadata-url', url('ut-zap50k-data.zip'),
            '--retries', '1', '--backoff', '0.01', '--timeout', '5', *SMALL, *extra]


def get(out, url, *extra):
    """get_data.main in-process; a user error is raised as GetDataError."""
    get_data.main(flags(out, url, *extra))


PORT = closed_port()


def dead_url(name):
    """An address where nothing listens."""
    return f'http://127.0.0.1:{PORT}/{name}'


# --------------------------------------------------------------------------------------------- downloading

@pytest.mark.slow
def test_an_interrupted_download_resumes_with_range_and_ends_byte_identical(server, tmp_path):
    blob = os.urandom(300_000)
    server.state['files']['/blob.bin'] = blob
    server.state['cut']['/blob.bin'] = 100_000
    logs = []
    dest = str(tmp_path / 'blob.bin')
    zappos.download(server.url('blob.bin'), dest, retries=2, timeout=5, backoff=0.01, log=logs.append)
    assert open(dest, 'rb').read() == blob and not os.path.exists(dest + '.part')
    assert server.state['requests'] == [('/blob.bin', None), ('/blob.bin', 'bytes=100000-')]
    assert 'connection closed after 100000 of 300000 bytes; retrying' in '\n'.join(logs)


@pytest.mark.slow
def test_a_server_that_ignores_range_makes_the_download_start_over(server, tmp_path):
    blob = os.urandom(50_000)
    server.state['files']['/blob.bin'] = blob
    server.state['ignore_range'] = True
    dest = tmp_path / 'blob.bin'
    (tmp_path / 'blob.bin.part').write_bytes(b'stale bytes of another file')
    zappos.download(server.url('blob.bin'), str(dest), retries=0, timeout=5, backoff=0.01, log=lambda m: None)
    assert dest.read_bytes() == blob
    assert server.state['requests'] == [('/blob.bin', 'bytes=27-')]


@pytest.mark.slow
def test_a_part_file_that_is_already_whole_is_kept(server, tmp_path):
    blob = os.urandom(10_000)
    server.state['files']['/blob.bin'] = blob
    (tmp_path / 'blob.bin.part').write_bytes(blob)
    zappos.download(server.url('blob.bin'), str(tmp_path / 'blob.bin'), retries=0, timeout=5, backoff=0.01,
                    log=lambda m: None)
    assert (tmp_path / 'blob.bin').read_bytes() == blob and server.state['requests'] == [('/blob.bin', 'bytes=10000-')]


@pytest.mark.slow
def test_server_errors_are_retried_with_back_off_and_a_dead_link_is_not(server, tmp_path):
    server.state['status']['/busy.bin'] = 503
    logs = []
    with pytest.raises(zappos.DownloadError, match=r'busy.bin: HTTP 503 .*gave up after 3 attempts') as e:
        zappos.download(server.url('busy.bin'), str(tmp_path / 'b'), retries=2, timeout=5, backoff=0.01,
                        log=logs.append)
    assert len(server.state['requests']) == 3 and not e.value.unreachable
    assert 'retrying in 0.01 s' in logs[1] and 'retrying in 0.02 s' in logs[2]
    with pytest.raises(zappos.DownloadError, match=r'gone.bin: HTTP 404') as e:
        zappos.download(server.url('gone.bin'), str(tmp_path / 'g'), retries=5, timeout=5, backoff=0.01,
                        log=logs.append)
    assert len(server.state['requests']) == 4 and not e.value.unreachable


@pytest.mark.slow
def test_no_server_at_all_is_reported_as_unreachable(tmp_path):
    with pytest.raises(zappos.DownloadError, match=re.escape(dead_url('x.zip'))) as e:
        zappos.download(dead_url('x.zip'), str(tmp_path / 'x.zip'), retries=1, timeout=2, backoff=0.01,
                        log=lambda m: None)
    assert e.value.unreachable and not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------------------ archives

def test_check_zip_refuses_a_truncated_archive(archives, tmp_path):
    whole = archives['dir'] / 'ut-zap50k-images.zip'
    zappos.check_zip(str(whole))
    cut = tmp_path / 'cut.zip'
    cut.write_bytes(whole.read_bytes()[:-200])
    with pytest.raises(zappos.BadArchive, match=re.escape(str(cut)) + ' is not a whole zip'):
        zappos.check_zip(str(cut))


def evil_zip(path, bad):
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('ut-zap50k-images/ok.jpg', b'fine')
        if bad == 'symlink':
            info = zipfile.ZipInfo('ut-zap50k-images/link')
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, '../../../evil')
        else:
            z.writestr(bad, b'evil')
    return path


@pytest.mark.parametrize('bad', ['../evil', 'ut-zap50k-images/../../evil', '/abs/evil', 'C:/evil', 'a\\..\\..\\evil',
                                 'symlink'])
def test_safe_extract_refuses_members_that_escape_and_writes_nothing(tmp_path, bad):
    zpath = str(evil_zip(tmp_path / 'evil.zip', bad))
    target = tmp_path / 'box' / 'target'
    target.mkdir(parents=True)
    name = 'ut-zap50k-images/link' if bad == 'symlink' else bad
    with pytest.raises(dataset_writer.GetDataError, match=re.escape(f'{zpath}: refusing to extract member {name!r}')):
        zappos.safe_extract(zpath, str(target), log=lambda m: None)
    assert os.listdir(target) == []
    assert [f for _, _, files in os.walk(tmp_path) for f in files] == ['evil.zip']


def test_safe_extract_keeps_folder_names_that_end_with_a_period(archives, tmp_path):
    zappos.safe_extract(str(archives['dir'] / 'ut-zap50k-images.zip'), str(tmp_path), log=lambda m: None)
    for p in image_paths():
        assert (tmp_path / 'ut-zap50k-images' / p).read_bytes()[:2] == b'\xff\xd8'


# ------------------------------------------------------------------------------------------------ metadata

@pytest.mark.parametrize('text,expected', [
    ('Flat', 'flat'), ('Under 1in', 'low'), ('1in - 1 3/4in', 'low'), ('2in - 2 3/4in', 'mid'),
    ('3in - 3 3/4in', 'mid'), ('4in - 4 3/4in', 'high'), ('5in & over', 'high'), (' 1.5in ', 'low'),
    ('', ''), ('Flat;Under 1in', ''), ('unknown', ''), ('Under 6in', ''),
])
def test_heel_bins(text, expected):
    assert zappos.heel_bin(text) == expected


def test_read_metadata_pairs_rows_with_paths_whatever_the_mat_variable_is_called(tmp_path):
    rows = metadata_rows()
    write_metadata(tmp_path, variable='paths_of_images', rows=rows)
    paths, got = zappos.read_metadata(str(tmp_path / 'meta-data.csv'), str(tmp_path / 'image-path.mat'))
    assert paths == [p for p, _ in rows] and len(got) == len(rows)
    assert got[0]['Category'] == 'Shoes' and got[0]['Material'] == 'Leather,Rubber'     # a quoted cell with a comma
    labels = zappos.metadata_labels(got)
    assert labels['gender'][5] == '' and labels['closure'][11] == '' and labels['heel'][7] == ''   # that notion only
    assert (labels['class'][5], labels['gender'][4], labels['heel'][0]) == ('Boots', 'Women', 'flat')
    scipy.io.savemat(str(tmp_path / 'image-path.mat'), {'imagepath': np.array(['a.jpg'], dtype=object).reshape(1, 1)})
    with pytest.raises(dataset_writer.GetDataError,
                       match=r'image-path.mat lists 1 image paths but .*meta-data.csv has 50'):
        zappos.read_metadata(str(tmp_path / 'meta-data.csv'), str(tmp_path / 'image-path.mat'))
    (tmp_path / 'meta-data.csv').write_text('CID,Category,Closure\n1,Shoes,Buckle\n')
    with pytest.raises(dataset_writer.GetDataError, match=r'meta-data.csv:1: no column\(s\) Gender, HeelHeight'):
        zappos.read_metadata(str(tmp_path / 'meta-data.csv'), str(tmp_path / 'image-path.mat'))


# ------------------------------------------------------------------------------------------- get_data.py end to end

def read_lists(out):
    return {f'tripletlists/{n}_tripletlist_{s}.txt': open(os.path.join(out, 'tripletlists',
                                                                       f'{n}_tripletlist_{s}.txt')).read()
            for n in NOTIONS for s in SPLITS}


@pytest.mark.slow
def test_paper_triplets_end_to_end_resuming_a_cut_download_and_a_second_run_does_nothing(server, archives,
                                                                                          tmp_path, capsys):
    out = tmp_path / 'data'
    server.state['cut']['/ut-zap50k-images.zip'] = 3000
    get(out, server.url)
    assert (out / 'ut-zap50k-images.zip').read_bytes() == server.state['files']['/ut-zap50k-images.zip']
    assert ('/ut-zap50k-images.zip', 'bytes=3000-') in server.state['requests']
    assert (out / 'filenames.json').read_text() == archives['names'] and read_lists(out) == archives['lists']
    assert not (out / 'dataset.json').exists() and not list(out.glob('*.part')) and not list(out.glob('.*'))
    info = load_dataset_info(str(out))                                  # main.py's reader, Zappos defaults
    assert info.notions == NOTIONS and len(info.filenames) == N_IMAGES and missing_images(info) == []
    trip, cond = load_triplets(info, 'test', [0, 1, 2, 3], 40, seed=0)
    assert trip.shape == (40, 3) and sorted(set(cond.tolist())) == [0, 1, 2, 3]
    assert json.loads((out / 'zappos.json').read_text())['triplets'] == 'paper'
    assert 'Zappos50k ready (48 images, paper triplets)' in capsys.readouterr().out
    n_requests = len(server.state['requests'])
    get(out, server.url)
    assert len(server.state['requests']) == n_requests
    assert 'already there (48 images, paper triplets); nothing to do' in capsys.readouterr().out


@pytest.mark.slow
def test_a_dead_triplets_link_falls_back_to_metadata_triplets_that_follow_the_labels(server, tmp_path, capsys):
    out = tmp_path / 'data'
    server.state['status']['/csn_zappos_triplets.zip'] = 404
    get(out, server.url, '--max-left-out', '0.05')                     # 2 of the fake's 50 rows name no image
    said = capsys.readouterr().out
    assert re.search(r"the paper's triplets are not available \(the link looks dead: http://.*csn_zappos_triplets"
                     r"\.zip: HTTP 404 Not Found\. If the file has moved, pass its new address with --triplets-url",
                     said)
    assert 'left out 2 of 50 metadata rows: 1 without an image path; 1 whose image is not in' in said
    info = load_dataset_info(str(out))
    assert info.name == 'zappos50k' and info.notions == NOTIONS and sorted(info.filenames) == sorted(image_paths())
    assert info.hflip is True                                           # a mirrored shoe is still the same shoe
    labels = read_labels(info)
    for i, p in enumerate(info.filenames):                              # rows stay paired with their image
        assert labels['class'][i] == p.split('/')[0]
    assert set(labels['heel']) == {'flat', 'low', 'mid', 'high', ''} and labels['gender'].count('') == 1
    with open(info.labels_file) as f:
        split_of = [r['split'] for r in csv.DictReader(f)]
    assert {s: split_of.count(s) for s in SPLITS} == {'train': 24, 'val': 12, 'test': 12}
    for n in NOTIONS:
        for s in SPLITS:
            trip, _, problems = check_triplet_file(info.triplet_file(n, s), len(info.filenames))
            assert problems == [] and len(trip) > 0
            for a, far, close in trip:
                assert labels[n][a] == labels[n][close] != labels[n][far] and labels[n][far] != ''
                assert split_of[a] == split_of[far] == split_of[close] == s    # each split uses its own images
    assert 'found 35 image(s) under another spelling of their folder' in said and '1 by their file name' in said
    n_requests = len(server.state['requests'])
    get(out, server.url, '--max-left-out', '0.05')                     # the same settings: nothing to do
    assert len(server.state['requests']) == n_requests and 'already there' in capsys.readouterr().out
    server.state['status'].clear()
    get(out, server.url, '--triplets', 'paper')                        # the paper's now: dataset.json goes
    assert not (out / 'dataset.json').exists() and not (out / 'labels.csv').exists()
    assert load_dataset_info(str(out)).notions == NOTIONS and read_lists(out)['tripletlists/heel_tripletlist_val.txt']


@pytest.mark.slow
@pytest.mark.parametrize('times', [1, 2])
def test_a_truncated_archive_is_downloaded_once_more_then_reported(server, tmp_path, capsys, times):
    whole = server.state['files']['/ut-zap50k-images.zip']
    if times == 1:
        server.state['once']['/ut-zap50k-images.zip'] = whole[:len(whole) // 2]
        get(tmp_path / 'data', server.url)
        assert 'is not a whole zip archive' in capsys.readouterr().out
        assert (tmp_path / 'data' / 'ut-zap50k-images.zip').read_bytes() == whole
    else:
        server.state['files']['/ut-zap50k-images.zip'] = whole[:len(whole) // 2]
        with pytest.raises(GetDataError, match=r'ut-zap50k-images.zip is not a whole zip archive .*came broken twice'):
            get(tmp_path / 'data', server.url)
        assert not (tmp_path / 'data' / 'ut-zap50k-images').exists()
    assert [p for p, _ in server.state['requests']].count('/ut-zap50k-images.zip') == 2


@pytest.mark.parametrize('gone,mode,flag', [('ut-zap50k-images.zip', 'auto', '--images-url'),
                                             ('csn_zappos_triplets.zip', 'paper', '--triplets-url')])
@pytest.mark.slow
def test_a_dead_link_without_a_fallback_says_which_flag_to_use(server, tmp_path, gone, mode, flag):
    server.state['status']['/' + gone] = 410
    with pytest.raises(GetDataError, match=rf'{re.escape(server.url(gone))}: HTTP 410 Gone\. If the file has moved, '
                                         rf'pass its new address with {flag}, .* --from FOLDER'):
        get(tmp_path / 'data', server.url, '--triplets', mode)
    assert [p for p, _ in server.state['requests']].count('/' + gone) == 1          # no retries for a dead link
    assert not (tmp_path / 'data' / 'filenames.json').exists()


@pytest.mark.slow
def test_a_damaged_member_stops_the_extraction_and_leaves_no_images_folder(server, tmp_path):
    path = tmp_path / 'damaged.zip'
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
        for i in range(5):
            z.writestr(f'ut-zap50k-images/Shoes/{i}.jpg', b'<%d>' % i * 1000)
    data = bytearray(path.read_bytes())
    data[data.index(b'<3>') + 100] ^= 1                                 # one bit of member 3: the CRC check fails
    server.state['files']['/ut-zap50k-images.zip'] = bytes(data)
    with pytest.raises(GetDataError, match=r"ut-zap50k-images.zip: member 'ut-zap50k-images/Shoes/3.jpg' is damaged"):
        get(tmp_path / 'data', server.url)
    assert sorted(os.listdir(tmp_path / 'data')) == ['ut-zap50k-images.zip']   # no half-extracted folder


@pytest.mark.slow
def test_a_malicious_images_archive_is_refused_and_nothing_lands_outside(server, tmp_path):
    server.state['files']['/ut-zap50k-images.zip'] = evil_zip(tmp_path / 'evil.zip', '../../evil').read_bytes()
    with pytest.raises(GetDataError, match=r"ut-zap50k-images.zip: refusing to extract member '../../evil'"):
        get(tmp_path / 'a' / 'data', server.url)
    assert not (tmp_path / 'a' / 'data' / 'ut-zap50k-images').exists()
    assert sorted(f for _, _, files in os.walk(tmp_path) for f in files) == ['evil.zip', 'ut-zap50k-images.zip']


def test_from_dir_needs_no_network(archives, tmp_path, capsys):
    hand = tmp_path / 'Downloads'
    hand.mkdir()
    shutil.copy(archives['dir'] / 'ut-zap50k-images.zip', hand)
    shutil.copy(archives['dir'] / 'flat' / 'csn_zappos_triplets.zip', hand)    # no top folder in this one
    out = tmp_path / 'data'
    get(out, dead_url, '--from', str(hand))
    assert (out / 'filenames.json').read_text() == archives['names'] and read_lists(out) == archives['lists']
    assert sorted(os.listdir(hand)) == ['csn_zappos_triplets.zip', 'ut-zap50k-images.zip']   # read in place
    assert not (out / 'ut-zap50k-images.zip').exists()
    with pytest.raises(GetDataError, match=r'--from .*Downloads: no ut-zap50k-data.zip there; download it from http'):
        get(out, dead_url, '--from', str(hand), '--triplets', 'metadata')


def test_another_dataset_in_out_is_not_overwritten(tmp_path):
    out = tmp_path / 'fonts'
    out.mkdir()
    (out / 'dataset.json').write_text('{"name": "fonts", "images": "images", "notions": ["font"]}')
    with pytest.raises(GetDataError, match=r'--out .*fonts holds another dataset .*--force'):
        get(out, dead_url)


@pytest.mark.slow
def test_no_network_says_which_urls_to_fetch_and_about_from(tmp_path):
    """As a user runs it: `python get_data.py` exits 2 with one clear line, no traceback."""
    p = subprocess.run([sys.executable, os.path.join(REPO, 'get_data.py'), *flags(tmp_path / 'data', dead_url)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    line = error_line(p)
    assert p.stderr.startswith(f'error: cannot reach {dead_url("ut-zap50k-images.zip")}') and p.stderr == line + '\n'
    for name in ('ut-zap50k-images.zip', 'csn_zappos_triplets.zip', 'ut-zap50k-data.zip'):
        assert dead_url(name) in p.stderr
    assert '--from FOLDER' in p.stderr
    assert not (tmp_path / 'data' / 'ut-zap50k-images').exists()


# ------------------------------------------------------------------- the metadata path with the real formats

def write_images(root, paths):
    for i, p in enumerate(paths):
        os.makedirs(os.path.dirname(os.path.join(root, p)), exist_ok=True)
        with open(os.path.join(root, p), 'wb') as f:
            f.write(jpeg(i))


def test_every_image_is_found_under_the_spellings_of_the_images_zip(tmp_path):
    """image-path.mat spells 'Neil M.', "Levi's "; the zip 'Neil M', "Levi's&#174; "; one image is in another folder."""
    write_images(tmp_path, image_paths())
    rows = [r for _, r in metadata_rows()[:N_IMAGES]]
    keep, left, respelled, by_file = zappos.match_images(listed_paths(), [dict(zip(CSV_HEADER, r)) for r in rows],
                                                         str(tmp_path))
    assert left == [] and [p for _, p in keep] == image_paths() and [i for i, _ in keep] == list(range(N_IMAGES))
    assert respelled == sum(1 for i in range(N_IMAGES) if i % 8 < 6 and i != MOVED) and by_file == 1
    for listed, on_disk in FOLDERS:
        assert on_disk + '/' + listed_paths()[0].rsplit('/', 1)[1] in zappos.spellings(
            listed + '/' + listed_paths()[0].rsplit('/', 1)[1])


CSV_HEADER = ['CID', 'Category', 'SubCategory', 'HeelHeight', 'Insole', 'Closure', 'Gender', 'Material', 'ToeStyle']


def test_a_cid_that_is_not_its_image_name_leaves_the_row_out_and_says_why(tmp_path):
    write_images(tmp_path, image_paths())
    rows = [dict(zip(CSV_HEADER, r)) for _, r in metadata_rows()[:N_IMAGES]]
    # 7965307-5291 is 7965307.5291.jpg
    assert rows[3]['CID'] == '1003-21' and listed_paths()[3].endswith('/1003.21.jpg')
    rows[3]['CID'], rows[4]['CID'] = rows[4]['CID'], rows[3]['CID']                     # two rows swapped
    paths = listed_paths() + [listed_paths()[0]]                                        # and one image listed twice
    rows.append(dict(rows[0]))
    keep, left, _, _ = zappos.match_images(paths, rows, str(tmp_path))
    assert [(i, why) for i, why, _ in left] == [(3, 'cid'), (4, 'cid'), (N_IMAGES, 'repeated')]
    assert len(keep) == N_IMAGES - 2 and 'CID 1004-28 with' in left[0][2]
    said = zappos.left_out_summary(left, 'IMG')
    assert said == ("2 whose CID is not the image's file name (7965307-5291 is 7965307.5291.jpg) (e.g. CID 1004-28 "
                    f"with {listed_paths()[3]}, CID 1003-21 with {listed_paths()[4]}); 1 repeating an earlier image "
                    f"(e.g. {listed_paths()[0]} (row 2 of meta-data.csv))")


def test_na_like_cells_are_empty_not_labels_of_their_own(tmp_path):
    rows = metadata_rows()
    for i, na in zip((0, 1, 2, 3, 8), ('NA', 'NaN', 'N/A', ' n/a ', 'null')):
        rows[i][1][6] = na                                                              # Gender
    rows[9][1][3] = 'NaN'                                                               # HeelHeight
    write_metadata(tmp_path, rows=rows)
    _, got = zappos.read_metadata(str(tmp_path / 'meta-data.csv'), str(tmp_path / 'image-path.mat'))
    labels = zappos.metadata_labels(got)
    assert [labels['gender'][i] for i in (0, 1, 2, 3, 8)] == [''] * 5 and labels['heel'][9] == ''
    assert not {'NA', 'NaN', 'N/A', 'n/a', 'null'} & {v for vs in labels.values() for v in vs}
    assert labels['gender'][4] == 'Women' and labels['class'][0] == 'Shoes'            # other cells untouched


def metadata_from(tmp_path, archives, rows=None):
    """A --from folder with the images zip and a data zip of these meta-data rows."""
    hand = tmp_path / 'hand'
    hand.mkdir()
    shutil.copy(archives['dir'] / 'ut-zap50k-images.zip', hand)
    write_metadata(tmp_path / 'meta', rows=rows)
    make_zip(hand / 'ut-zap50k-data.zip', [(f'ut-zap50k-data/{f}', (tmp_path / 'meta' / f).read_bytes())
                                           for f in ('meta-data.csv', 'image-path.mat')])
    return hand


def test_more_rows_left_out_than_max_left_out_allows_stop_the_build(archives, tmp_path, capsys):
    rows = metadata_rows()[:N_IMAGES]
    for i in range(0, 6):                                 # the CIDs of six rows shifted by one: rows and paths disagree
        rows[i][1][0] = rows[i + 1][1][0]
    hand = metadata_from(tmp_path, archives, rows)
    out = tmp_path / 'data'
    with pytest.raises(GetDataError, match=r'meta-data.csv: 6 of 48 metadata rows \(12\.5%\) would be left out, more '
                                           r'than --max-left-out 0\.01 allows: 6 whose CID is not the image\'s file '
                                           r'name.*or pass --max-left-out 0\.13 to build without them'):
        get(out, dead_url, '--from', str(hand), '--triplets', 'metadata')
    assert not (out / 'filenames.json').exists() and not (out / 'tripletlists').exists()
    get(out, dead_url, '--from', str(hand), '--triplets', 'metadata', '--max-left-out', '0.13', '--seed', '2')
    said = capsys.readouterr().out
    assert 'left out 6 of 48 metadata rows: 6 whose CID is not' in said and 'ready (42 images' in said
    with open(out / zappos.LEFT_OUT) as f:
        listed = list(csv.DictReader(f))
    assert [int(r['line']) for r in listed] == list(range(2, 8)) and {r['reason'] for r in listed} == {
        "whose CID is not the image's file name (7965307-5291 is 7965307.5291.jpg)"}
    assert json.loads((out / 'zappos.json').read_text())['metadata_rows_left_out'] == {'cid': 6}
    info = load_dataset_info(str(out))
    assert sorted(info.filenames) == sorted(image_paths()[6:])


def test_the_real_spellings_keep_every_image_with_the_default_max_left_out(archives, tmp_path, capsys):
    """No row is lost to a spelling: the fake's 48 images under the zip's spellings all make it, at the default."""
    hand = metadata_from(tmp_path, archives, metadata_rows()[:N_IMAGES])
    out = tmp_path / 'data'
    get(out, dead_url, '--from', str(hand), '--triplets', 'metadata')
    said = capsys.readouterr().out
    assert 'metadata rows' not in said and 'ready (48 images, metadata triplets)' in said
    assert sorted(load_dataset_info(str(out)).filenames) == sorted(image_paths())
    assert list(csv.reader(open(out / zappos.LEFT_OUT))) == [['line', 'CID', 'reason', 'detail']]


def test_max_left_out_is_a_fraction():
    for bad in ('-0.1', '1.5', 'lots'):
        with pytest.raises(SystemExit):
            get_data.build_parser().parse_args(['--max-left-out', bad])
    assert get_data.build_parser().parse_args(['--max-left-out', '1']).max_left_out == 1.0


# ------------------------------------------------------------------------------ extraction stops at a size limit

def bomb(path, mib=100):
    """A zip of a few hundred KiB whose one member unpacks to `mib` MiB of zeros."""
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as z:
        z.writestr('ut-zap50k-images/ok.jpg', b'fine')
        with z.open('ut-zap50k-images/zeros.jpg', 'w') as f:
            for _ in range(mib):
                f.write(bytes(1 << 20))
    return path


def test_an_archive_that_says_it_unpacks_to_too_much_is_refused_before_writing(tmp_path):
    zpath = bomb(tmp_path / 'bomb.zip')
    assert os.path.getsize(zpath) < 1 << 20
    target = tmp_path / 'box'
    with pytest.raises(GetDataError, match=r'bomb.zip: its directory says it unpacks to 100\.0 MiB, over the limit of '
                                           r'64\.0 MiB \(--max-unpacked-gb, and at most 200 times'
                                           r'.*nothing was extracted'):
        zappos.safe_extract(str(zpath), str(target), log=lambda m: None)
    assert not target.exists()
    with pytest.raises(GetDataError, match=r'unpacks to 100\.0 MiB, over the limit of 50\.0 MiB'):
        zappos.safe_extract(str(zpath), str(target), log=lambda m: None, max_bytes=50 << 20)
    zappos.safe_extract(str(zpath), str(target), log=lambda m: None, max_bytes=101 << 20)   # allowed: extracted whole
    assert (target / 'ut-zap50k-images' / 'zeros.jpg').stat().st_size == 100 << 20


def test_a_bomb_given_as_the_images_archive_leaves_nothing_behind(tmp_path):
    hand = tmp_path / 'hand'
    hand.mkdir()
    bomb(hand / 'ut-zap50k-images.zip')
    out = tmp_path / 'data'
    with pytest.raises(GetDataError, match=r'ut-zap50k-images.zip: its directory says it unpacks to 100\.0 MiB'):
        get(out, dead_url, '--from', str(hand))
    assert [f for _, _, files in os.walk(out) for f in files] == []
    with pytest.raises(GetDataError, match=r'over the limit of 10\.0 MiB'):
        get(out, dead_url, '--from', str(hand), '--max-unpacked-gb', str(10 / 1024))


def test_bytes_written_past_the_limit_stop_the_extraction_and_what_was_written_goes(tmp_path, monkeypatch):
    """A member whose stream yields more than its directory entry says (a lying archive) is stopped while written."""
    zpath = make_zip(tmp_path / 'liar.zip', [('top/a/ok.jpg', b'x' * 1000), ('top/b/big.jpg', b'y' * 1000)])
    real_open = zipfile.ZipFile.open

    def lying_open(self, m, *a, **k):
        if getattr(m, 'filename', m) == 'top/b/big.jpg':
            return io.BytesIO(b'y' * 5000)
        return real_open(self, m, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, 'open', lying_open)
    target = tmp_path / 'box'
    target.mkdir()
    (target / 'mine.txt').write_text('was here before')
    with pytest.raises(GetDataError, match=r"liar.zip: member 'top/b/big.jpg' unpacks to more than the 1000 bytes its "
                                           r"directory says; stopped, and what was extracted is removed"):
        zappos.safe_extract(str(zpath), str(target), log=lambda m: None)
    assert sorted(os.listdir(target)) == ['mine.txt']                 # only what was there before


def test_the_paper_archive_with_a_filenames_json_that_is_not_utf8_names_its_line(archives, tmp_path):
    hand = tmp_path / 'hand'
    hand.mkdir()
    shutil.copy(archives['dir'] / 'ut-zap50k-images.zip', hand)
    names = archives['names'].encode().replace(b'\n', b'\xff\n', 3)
    make_zip(hand / 'csn_zappos_triplets.zip', [('filenames.json', names)] + list(archives['lists'].items()))
    with pytest.raises(GetDataError, match=r'filenames.json:1: not UTF-8 text \(byte 0xff.*csn_zappos_triplets.zip is '
                                           r'not the expected archive'):
        get(tmp_path / 'data', dead_url, '--from', str(hand), '--triplets', 'paper')
    assert not (tmp_path / 'data' / 'filenames.json').exists()


def test_a_meta_data_csv_that_is_not_csv_names_its_line(tmp_path):
    write_metadata(tmp_path)
    with open(tmp_path / 'meta-data.csv', 'a') as f:
        f.write('1-2,Shoes,' + 'x' * 200_000 + '\n')                      # over the csv module's field limit
    with pytest.raises(GetDataError, match=r'meta-data.csv:\d+: not a readable CSV line'):
        zappos.read_metadata(str(tmp_path / 'meta-data.csv'), str(tmp_path / 'image-path.mat'))
