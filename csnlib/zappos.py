"""UT-Zappos50k for get_data.py: download (or take from --from DIR), check and safely extract the archives into the
layout main.py reads, with the paper's triplets or triplets drawn from the UT-Zappos50k metadata.

    DIR/ut-zap50k-images/<Category>/<SubCategory>/<Brand>/<NAME>.jpg
    DIR/filenames.json                                  plain text, line i = path of image i under ut-zap50k-images/
    DIR/tripletlists/<notion>_tripletlist_<split>.txt   lines `anchor far close`, notions class closure gender heel
    DIR/dataset.json, DIR/labels.csv                    only for metadata triplets (labels for retrieval mAP)
    DIR/zappos.json                                     what was built; written last, so its presence means whole
"""
import argparse
import csv
import json
import math
import os
import re
import shutil
import socket
import stat
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from http.client import HTTPException

import numpy as np
from tqdm import tqdm

from csnlib.atomic import atomic_open, replace_tree
from csnlib.dataset_writer import GetDataError, parse_split, split_groups, write_all_triplets, write_layout
from csnlib.options import nonneg_float, nonneg_int, positive_float
from triplet_image_loader import (
    SPLITS,
    ZAPPOS_IMAGES,
    ZAPPOS_NOTIONS,
    DataError,
    check_triplet_file,
    format_problems,
    load_dataset_info,
    utf8_text,
)
from triplet_image_loader import missing_images as loader_missing_images

URLS = {
    'images': 'http://vision.cs.utexas.edu/projects/finegrained/utzap50k/ut-zap50k-images.zip',
    'triplets': 'https://vision.cornell.edu/se3/wp-content/uploads/2019/05/csn_zappos_triplets.zip',
    'metadata': 'http://vision.cs.utexas.edu/projects/finegrained/utzap50k/ut-zap50k-data.zip',
}
ARCHIVES = {'images': 'ut-zap50k-images.zip', 'triplets': 'csn_zappos_triplets.zip', 'metadata': 'ut-zap50k-data.zip'}
RECORD = 'zappos.json'
LEFT_OUT = 'metadata_left_out.csv'
CHUNK = 1 << 20
MAX_RATIO = 200                                                         # unpacked / archive size: more is a zip bomb
RATIO_FLOOR = 64 << 20                                                  # bytes any archive may unpack to
NA_CELLS = {'na', 'n/a', 'n.a.', 'nan', 'none', 'null', 'nil', '-', '?'}  # cells that mean "no value"


class DownloadError(GetDataError):
    """A download that failed; `unreachable` is True when no server answered (no network, DNS, refused, timeout)."""

    def __init__(self, msg, url, unreachable=False):
        super().__init__(msg)
        self.url, self.unreachable = url, unreachable


class BadArchive(GetDataError):
    """An archive that is not a whole zip file."""


class MissingArchive(GetDataError):
    """An archive that --from DIR does not hold."""


# ----------------------------------------------------------------------------------------------- downloading

class _Short(Exception):
    """The server closed the connection before the whole file came."""


def _fetch(url, part, timeout):
    """One attempt: append to `part` from where it ends (HTTP Range), or start over when the server ignores Range."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {'User-Agent': 'csn-get-data/1.0'}
    if have:
        headers['Range'] = f'bytes={have}-'
    try:
        r = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:                                      # nothing left to send: whole, or too long
            total = (e.headers.get('Content-Range') or '').rpartition('/')[2]
            e.close()
            if total.isdigit() and int(total) == have:
                return
            os.remove(part)
            raise _Short(f'{part} did not match the file on the server; starting over') from None
        raise
    with r:
        start = 0
        if r.status == 206:
            m = re.match(r'bytes (\d+)-', r.headers.get('Content-Range') or '')
            start = int(m.group(1)) if m else -1
            if start != have:
                os.remove(part)
                raise _Short(f'the server resumed at byte {start}, not {have}; starting over')
        length = r.headers.get('Content-Length')
        total = start + int(length) if length and length.isdigit() else None
        with open(part, 'ab' if start else 'wb') as f, \
                tqdm(total=total, initial=start, unit='B', unit_scale=True, unit_divisor=1024,
                     desc=os.path.basename(part)[:-len('.part')], disable=None, leave=False) as bar:
            while True:
                chunk = r.read(CHUNK)
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
        got = os.path.getsize(part)
        if total is not None and got != total:
            raise _Short(f'connection closed after {got} of {total} bytes')


def download(url, dest, retries=5, timeout=60, backoff=2.0, log=print):
    """Download url to dest via dest.part, resuming it with HTTP Range; retry network errors with exponential
    back-off (backoff, 2*backoff, ... seconds). Raises DownloadError naming the URL."""
    part = dest + '.part'
    log(f'downloading {url} -> {dest}' + (f' (resuming at {os.path.getsize(part)} bytes)'
                                          if os.path.exists(part) else ''))
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, timeout)
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as e:
            reason, unreachable = f'HTTP {e.code} {e.reason}', False
            if 400 <= e.code < 500 and e.code not in (408, 429):        # the link is wrong or gone: retrying won't help
                raise DownloadError(f'{url}: {reason}', url) from None
        except urllib.error.URLError as e:                              # DNS failure, connection refused, ...
            reason, unreachable = str(e.reason), True
        except (TimeoutError, socket.timeout) as e:
            reason, unreachable = f'no answer within --timeout {timeout:g} s ({e})', True
        except (_Short, ConnectionError, HTTPException) as e:
            reason, unreachable = str(e) or type(e).__name__, False
        if attempt == retries:
            raise DownloadError(f'{url}: {reason} (gave up after {retries + 1} attempts, see --retries)', url,
                                unreachable)
        wait = backoff * 2 ** attempt
        log(f'{url}: {reason}; retrying in {wait:g} s (attempt {attempt + 2} of {retries + 1})')
        time.sleep(wait)


# ------------------------------------------------------------------------------------------------- archives

def check_zip(path):
    """Raise BadArchive unless path is a whole zip: the central directory reads, every member lies inside the file."""
    if not zipfile.is_zipfile(path):
        raise BadArchive(f'{path} is not a whole zip archive (truncated download, or not a zip at all)')
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as z:
            for m in z.infolist():
                if m.header_offset + m.compress_size > size:
                    raise BadArchive(f'{path} is truncated: member {m.filename!r} runs past the end of the file')
    except zipfile.BadZipFile as e:
        raise BadArchive(f'{path} is not a whole zip archive ({e})') from None


def _member_parts(m):
    """The path components of a zip member, or the reason to refuse it."""
    name = m.filename.replace('\\', '/')
    if stat.S_ISLNK(m.external_attr >> 16):
        return None, 'it is a symbolic link'
    if name.startswith('/'):
        return None, 'it has an absolute path'
    if re.match(r'^[A-Za-z]:', name):
        return None, 'it starts with a drive letter'
    parts = [p for p in name.split('/') if p not in ('', '.')]
    if '..' in parts:
        return None, 'it has a ".." component'
    return parts, None


def extract_limit(zip_path, max_gb):
    """The most bytes zip_path may unpack to: max_gb GiB, and MAX_RATIO times the archive's size (RATIO_FLOOR at
    least), whichever is less."""
    return int(min(max_gb * 2 ** 30, max(MAX_RATIO * os.path.getsize(zip_path), RATIO_FLOOR)))


def _mib(n):
    return f'{n / 2 ** 20:,.1f} MiB'


def safe_extract(zip_path, target, log=print, max_bytes=None):
    """Extract zip_path into the folder target, refusing (before writing anything) any member with an absolute path,
    a drive letter, a '..' component or a symbolic link, so nothing lands outside target, and an archive whose
    directory says it unpacks to more than max_bytes (default: extract_limit at 4 GiB). Writing stops as soon as the
    bytes written pass max_bytes or a member's own size; then, and on any other failure, what was written goes."""
    target = os.path.realpath(target)
    max_bytes = extract_limit(zip_path, 4) if max_bytes is None else max_bytes
    with zipfile.ZipFile(zip_path) as z:
        plan = []
        for m in z.infolist():
            parts, why = _member_parts(m)
            if why:
                raise GetDataError(f'{zip_path}: refusing to extract member {m.filename!r}: {why}; nothing was '
                                   f'extracted. The archive is not the expected one: fetch it again from its source')
            if parts:
                dest = os.path.join(target, *parts)
                if os.path.commonpath([target, os.path.realpath(dest)]) != target:
                    raise GetDataError(f'{zip_path}: refusing to extract member {m.filename!r}: it would land '
                                       f'outside {target}; nothing was extracted')
                plan.append((m, dest))
        declared = sum(m.file_size for m, _ in plan)
        if declared > max_bytes:
            raise GetDataError(f'{zip_path}: its directory says it unpacks to {_mib(declared)}, over the limit of '
                               f'{_mib(max_bytes)} (--max-unpacked-gb, and at most {MAX_RATIO} times the archive\'s '
                               f'size); nothing was extracted. The archive is not the expected one: fetch it again '
                               f'from its source, or raise --max-unpacked-gb if it is')
        made = []                                                       # what this call created, to remove on failure
        try:
            _make_dirs(target, made)
            written = 0
            for m, dest in tqdm(plan, desc=f'extracting {os.path.basename(zip_path)}', unit='file', disable=None,
                                leave=False):
                if m.is_dir():
                    _make_dirs(dest, made)
                    continue
                _make_dirs(os.path.dirname(dest), made)
                try:
                    with z.open(m) as src, open(dest, 'wb') as dst:
                        made.append(dest)
                        mine = 0
                        while True:
                            chunk = src.read(CHUNK)
                            if not chunk:
                                break
                            mine += len(chunk)
                            written += len(chunk)
                            if mine > m.file_size or written > max_bytes:
                                raise GetDataError(
                                    f'{zip_path}: member {m.filename!r} unpacks to more than '
                                    + (f'the {m.file_size} bytes its directory says' if mine > m.file_size else
                                       f'the limit of {_mib(max_bytes)} for the archive (--max-unpacked-gb)')
                                    + '; stopped, and what was extracted is removed. Fetch the archive again from '
                                      'its source')
                            dst.write(chunk)
                except (zipfile.BadZipFile, EOFError, zlib.error) as e:
                    raise BadArchive(f'{zip_path}: member {m.filename!r} is damaged ({e}); delete the archive and '
                                     f'fetch it again') from None
                except OSError as e:
                    raise GetDataError(f'cannot write {dest} while extracting {zip_path}: {e}') from None
        except BaseException:
            for p in reversed(made):
                try:
                    os.rmdir(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
                except OSError:
                    pass
            raise


def _make_dirs(path, made):
    """os.makedirs(path, exist_ok=True), noting in `made` each folder it created (outermost first)."""
    todo = []
    while path and not os.path.isdir(path):
        todo.append(path)
        path = os.path.dirname(path)
    for p in reversed(todo):
        os.makedirs(p, exist_ok=True)
        made.append(p)


def _folder_with(root, name):
    """The shallowest folder under root that holds `name` (a file or folder), or None."""
    for here, dirs, files in sorted(os.walk(root), key=lambda t: t[0].count(os.sep)):
        if name in files or name in dirs:
            return here
    return None


# ------------------------------------------------------------------------------------------------- metadata

def heel_bin(text):
    """Heel height text of meta-data.csv -> 'flat' ('Flat'), 'low' (under 2 in: 'Under 1in', '1in - 1 3/4in'),
    'mid' (2 in to under 4 in: '2in - 2 3/4in', '3in - 3 3/4in'), 'high' (4 in and over: '4in - 4 3/4in',
    '5in & over'); a range goes by its lower end; '' when empty, multi-valued or unreadable."""
    t = single(text).lower()
    if not t:
        return ''
    if t.startswith('flat'):
        return 'flat'
    heights = [float(a) + (float(b) / float(c) if b else 0.0)
               for a, b, c in re.findall(r'(\d+(?:\.\d+)?)(?:\s+(\d+)/(\d+))?', t)]
    if not heights:
        return ''
    h = heights[0]
    if t.startswith('under'):                                           # below h: one bin only if h <= 2
        return 'low' if 0 < h <= 2 else ''
    return 'flat' if h == 0 else 'low' if h < 2 else 'mid' if h < 4 else 'high'


def single(value):
    """A cell's value, or '' when it is empty, NA-like or holds several values (separated by ';' or ',')."""
    value = cell(value)
    return '' if ';' in value or ',' in value else value


def cell(value):
    """A meta-data.csv cell stripped, '' for one that means no value (empty, NA, NaN, N/A, null, ...)."""
    value = (value or '').strip()
    return '' if value.lower() in NA_CELLS else value


def _mat_strings(x):
    """A loadmat cell array or char array -> list of str ('' for empty cells)."""
    def text(v):
        while isinstance(v, np.ndarray):
            if v.size == 0:
                return ''
            if v.dtype.kind == 'U' and v.size > 1:                      # a char matrix row kept as single characters
                return ''.join(v.ravel().tolist()).strip()
            v = v.ravel()[0]
        return str(v).strip()
    return [text(v) for v in np.asarray(x).ravel()]


def read_image_paths(mat_path, n_rows=None):
    """The image paths of image-path.mat, in row order: the variable 'imagepath', else the only cell or char array
    (the one with n_rows entries when several)."""
    import scipy.io
    try:
        data = scipy.io.loadmat(mat_path)
    except NotImplementedError as e:                                    # MATLAB v7.3 files are HDF5
        raise GetDataError(f'{mat_path}: cannot read this MATLAB file ({e})') from None
    except (ValueError, OSError, TypeError) as e:
        raise GetDataError(f'{mat_path}: not a readable MATLAB .mat file ({e})') from None
    found = {k: v for k, v in data.items()
             if not k.startswith('__') and hasattr(v, 'dtype') and v.dtype.kind in 'OU'}
    pick = [k for k in found if k.lower() == 'imagepath']
    if not pick:
        pick = [k for k in found if n_rows is None or found[k].size == n_rows] or list(found)
    if len(pick) != 1:
        raise GetDataError(f'{mat_path}: expected one cell array of image paths (named imagepath); found variables '
                           f'{", ".join(sorted(k for k in data if not k.startswith("__"))) or "none"}')
    return _mat_strings(found[pick[0]])


def read_metadata(csv_path, mat_path):
    """(image paths, rows): the paths of image-path.mat and the rows of meta-data.csv (dicts of stripped cells by
    column name), in the same order. Raises GetDataError naming the file on a missing column or a count mismatch."""
    try:
        with open(csv_path, newline='', encoding='utf-8-sig', errors='replace') as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            rows = [{k: cell(v) for k, v in r.items() if k is not None} for r in reader]
    except OSError as e:
        raise GetDataError(f'cannot read {csv_path}: {e}') from None
    except csv.Error as e:
        raise GetDataError(f'{csv_path}:{reader.line_num}: not a readable CSV line ({e})') from None
    need = ['CID', 'Category', 'Closure', 'Gender', 'HeelHeight']
    missing = [c for c in need if c not in header]
    if missing:
        raise GetDataError(f'{csv_path}:1: no column(s) {", ".join(missing)} (header: {", ".join(header) or "none"})')
    paths = read_image_paths(mat_path, len(rows))
    if len(paths) != len(rows):
        raise GetDataError(f'{mat_path} lists {len(paths)} image paths but {csv_path} has {len(rows)} rows; they '
                           f'must match row by row')
    return paths, rows


def metadata_labels(rows):
    """{notion: strings} from meta-data.csv rows: class = Category, closure = Closure, gender = Gender,
    heel = heel_bin(HeelHeight); a missing or multi-valued cell is '' (unknown) for that notion only."""
    return {'class': [single(r['Category']) for r in rows],
            'closure': [single(r['Closure']) for r in rows],
            'gender': [single(r['Gender']) for r in rows],
            'heel': [heel_bin(r['HeelHeight']) for r in rows]}


def spellings(path):
    """How a path of image-path.mat may be spelled in the images zip: as listed, with the brand folders' trailing
    period dropped ('Neil M.' as 'Neil M', 'T.U.K.' as 'T.U.K'), "Levi's " as "Levi's&#174; ", and both."""
    *dirs, name = path.split('/')
    nodot = [d.rstrip('.') or d for d in dirs]
    levis = lambda ds: [d.replace("Levi's ", "Levi's&#174; ") for d in ds]  # noqa: E731
    out = []
    for ds in (dirs, nodot, levis(dirs), levis(nodot)):
        p = '/'.join(ds + [name])
        if p not in out:
            out.append(p)
    return out


def cid_of(name):
    """The CID that an image file name stands for: '7965307.5291.jpg' -> '7965307-5291'."""
    return os.path.splitext(name)[0].replace('.', '-')


def images_on_disk(images_dir):
    """(set of the relative paths of every file under images_dir, {file name: [relative paths]})."""
    paths, by_name = set(), {}
    for here, _, files in os.walk(images_dir):
        rel = os.path.relpath(here, images_dir).replace(os.sep, '/')
        for f in files:
            p = f if rel == '.' else f'{rel}/{f}'
            paths.add(p)
            by_name.setdefault(f, []).append(p)
    return paths, by_name


LEFT_OUT_REASONS = {'no_path': 'without an image path', 'no_image': 'whose image is not in {images_dir}',
                    'ambiguous': 'whose file name is under several folders of {images_dir} and not under the '
                                 'listed one',
                    'cid': 'whose CID is not the image\'s file name (7965307-5291 is 7965307.5291.jpg)',
                    'no_cid': 'without a CID', 'repeated': 'repeating an earlier image'}


def match_images(paths, rows, images_dir):
    """Pair each metadata row with its image on disk: the path of image-path.mat in one of its spellings(), else the
    only file of that name. Returns (kept [(row, path on disk)], left out [(row, reason key, detail)], how many were
    found under another spelling, how many by file name alone)."""
    on_disk, by_name = images_on_disk(images_dir)
    keep, left, seen, respelled, by_file = [], [], {}, 0, 0
    for i, (p, r) in enumerate(zip(paths, rows)):
        p = _clean_path(p)
        if not p:
            left.append((i, 'no_path', ''))
            continue
        name = p.rsplit('/', 1)[-1]
        found = next((q for q in spellings(p) if q in on_disk), None)
        if found is None and len(by_name.get(name, [])) > 1:
            left.append((i, 'ambiguous', f'{p} (found as {", ".join(by_name[name][:3])})'))
            continue
        if found is None and not by_name.get(name):
            left.append((i, 'no_image', p))
            continue
        how = 'listed' if found == p else 'spelling' if found else 'name'
        found = found or by_name[name][0]
        if not r.get('CID'):
            left.append((i, 'no_cid', p))
        elif cid_of(name) != r['CID']:
            left.append((i, 'cid', f'CID {r["CID"]} with {p}'))
        elif found in seen:
            left.append((i, 'repeated', f'{p} (row {seen[found] + 2} of meta-data.csv)'))
        else:
            seen[found] = i
            keep.append((i, found))
            respelled += how == 'spelling'
            by_file += how == 'name'
    return keep, left, respelled, by_file


def _clean_path(p):
    p = p.replace('\\', '/').strip()
    while p.startswith('./'):
        p = p[2:]
    prefix = ZAPPOS_IMAGES + '/'
    return p[len(prefix):] if p.startswith(prefix) else p


# ----------------------------------------------------------------------------------------------- installing

def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _staging(out, what):
    path = os.path.join(out, f'.{what}.partial-{os.getpid()}')
    _remove(path)
    os.makedirs(path)
    return path


def install_images(zip_path, out, log=print, max_gb=4):
    """Extract the images archive into a temporary folder, then move its ut-zap50k-images/ into out."""
    tmp = _staging(out, 'images')
    try:
        safe_extract(zip_path, tmp, log, extract_limit(zip_path, max_gb))
        root = os.path.join(tmp, ZAPPOS_IMAGES)
        if not os.path.isdir(root):                                     # an archive without the top folder
            root = tmp
        n = sum(len(f) for _, _, f in os.walk(root))
        if n == 0:
            raise BadArchive(f'{zip_path} holds no files')
        replace_tree(root, os.path.join(out, ZAPPOS_IMAGES))
    finally:
        _remove(tmp)
    log(f'{os.path.join(out, ZAPPOS_IMAGES)}: {n} files from {zip_path}')


def _put_triplets(tmp, out, files):
    """Move tripletlists/ and files (filenames.json last) from tmp into out, so filenames.json appears only when the
    rest is in place; leftover dataset.json and labels.csv of an earlier build go."""
    _remove(os.path.join(out, 'filenames.json'))
    for name in ('dataset.json', 'labels.csv', LEFT_OUT):
        if name not in files:
            _remove(os.path.join(out, name))
    replace_tree(os.path.join(tmp, 'tripletlists'), os.path.join(out, 'tripletlists'))
    for name in files:
        if name != 'filenames.json':
            replace_tree(os.path.join(tmp, name), os.path.join(out, name))
    os.replace(os.path.join(tmp, 'filenames.json'), os.path.join(out, 'filenames.json'))


def install_paper(zip_path, out, log=print, max_gb=4):
    """The paper's filenames.json and tripletlists/ from csn_zappos_triplets.zip (with or without a top folder)."""
    tmp = _staging(out, 'triplets')
    try:
        safe_extract(zip_path, tmp, log, extract_limit(zip_path, max_gb))
        root = _folder_with(tmp, 'filenames.json')
        if root is None or not os.path.isdir(os.path.join(root, 'tripletlists')):
            raise GetDataError(f'{zip_path} does not hold filenames.json and tripletlists/: not the expected '
                               f'archive; fetch it again (delete it first) or use --triplets metadata')
        lists = os.path.join(root, 'tripletlists')
        missing = [f'{n}_tripletlist_{s}.txt' for n in ZAPPOS_NOTIONS for s in SPLITS
                   if not os.path.exists(os.path.join(lists, f'{n}_tripletlist_{s}.txt'))]
        if missing:
            raise GetDataError(f'{zip_path}: tripletlists/ lacks {", ".join(missing)}; fetch it again (delete it '
                               f'first) or use --triplets metadata')
        names = utf8_text(os.path.join(root, 'filenames.json'), GetDataError, f'{zip_path} is not the expected '
                          f'archive: fetch it again (delete it first) or use --triplets metadata')
        n_images = len([line for line in names.split('\n') if line.strip()])
        problems = []
        for n in ZAPPOS_NOTIONS:
            for s in SPLITS:
                problems += check_triplet_file(os.path.join(lists, f'{n}_tripletlist_{s}.txt'), n_images)[2]
        if problems:
            log(f'warning: {len(problems)} bad line(s) in the paper\'s triplet lists (main.py stops on them unless '
                f'--skip-bad-triplets):\n{format_problems(problems, 5)}')
        _put_triplets(root, out, ['filenames.json'])
    finally:
        _remove(tmp)
    log(f'{out}: the paper\'s triplets for {n_images} images from {zip_path}')


def install_metadata(zip_path, out, args, log=print):
    """filenames.json, labels.csv, dataset.json and triplets drawn per split from meta-data.csv and image-path.mat."""
    tmp = _staging(out, 'metadata')
    try:
        safe_extract(zip_path, tmp, log, extract_limit(zip_path, args.max_unpacked_gb))
        where = {name: _folder_with(tmp, name) for name in ('meta-data.csv', 'image-path.mat')}
        lacking = [name for name, d in where.items() if d is None]
        if lacking:
            raise GetDataError(f'{zip_path} does not hold {" and ".join(lacking)}: not the expected archive; fetch '
                               f'it again (delete it first)')
        csv_path = os.path.join(where['meta-data.csv'], 'meta-data.csv')
        paths, rows = read_metadata(csv_path, os.path.join(where['image-path.mat'], 'image-path.mat'))
        labels_all = metadata_labels(rows)
        images_dir = os.path.join(out, ZAPPOS_IMAGES)
        keep, left, respelled, by_file = match_images(paths, rows, images_dir)
        if respelled or by_file:
            log(f'found {respelled} image(s) under another spelling of their folder (a brand folder without its '
                f'trailing period, Levi\'s&#174;) and {by_file} by their file name alone')
        if not keep:
            raise GetDataError(f'no metadata row of {zip_path} names an image under {images_dir}; delete '
                               f'{images_dir} and run again to re-extract the images')
        said = left_out_summary(left, images_dir)
        share = len(left) / len(paths)
        if left and share > args.max_left_out:
            raise GetDataError(f'{csv_path}: {len(left)} of {len(paths)} metadata rows ({share:.1%}) would be left '
                               f'out, more than --max-left-out {args.max_left_out:g} allows: {said}. Check that the '
                               f'images and metadata archives belong together (delete {images_dir} to extract the '
                               f'images again), or pass --max-left-out {math.ceil(share * 100) / 100:g} to build '
                               f'without them')
        if left:
            log(f'left out {len(left)} of {len(paths)} metadata rows: {said} (each listed in {LEFT_OUT})')
        with open(os.path.join(tmp, LEFT_OUT), 'w', newline='') as f:
            w = csv.writer(f)
            w.writerow(['line', 'CID', 'reason', 'detail'])
            w.writerows([i + 2, rows[i].get('CID', ''), LEFT_OUT_REASONS[why].format(images_dir=ZAPPOS_IMAGES), what]
                        for i, why, what in left)
        filenames = [p for _, p in keep]
        labels = {n: [labels_all[n][i] for i, _ in keep] for n in ZAPPOS_NOTIONS}
        split_of = split_groups(filenames, parse_split(args.split), args.seed)
        sizes = {'train': args.train_triplets, 'val': args.val_triplets, 'test': args.test_triplets}
        counts = write_all_triplets(tmp, ZAPPOS_NOTIONS, labels, split_of, sizes, args.seed, log)
        write_layout(tmp, 'zappos50k', ZAPPOS_IMAGES, filenames, ZAPPOS_NOTIONS, labels,
                     [str(s) for s in split_of], True,
                     {'triplets': 'drawn from the UT-Zappos50k metadata (get_data.py --triplets metadata)',
                      'heel': 'flat, low (under 2 in), mid (2 to under 4 in), high (4 in and over)'})
        _put_triplets(tmp, out, ['filenames.json', 'labels.csv', 'dataset.json', LEFT_OUT])
    finally:
        _remove(tmp)
    unknown = ', '.join(f'{n} {sum(1 for v in labels[n] if not v)}' for n in ZAPPOS_NOTIONS)
    log(f'{out}: triplets drawn from the metadata for {len(filenames)} images; per notion train/val/test '
        f'{"/".join(str(sizes[s]) for s in SPLITS)} asked, class got '
        f'{"/".join(str(counts["class"][s]) for s in SPLITS)}; unknown (left out of that notion only): {unknown}')
    by_reason = {}
    for _, why, _ in left:
        by_reason[why] = by_reason.get(why, 0) + 1
    return len(filenames), by_reason


def left_out_summary(left, images_dir):
    """'1 without an image path; 2 whose image is not in DIR (e.g. a, b)' from match_images' left-out rows."""
    parts = []
    for why, text in LEFT_OUT_REASONS.items():
        details = [what for _, w, what in left if w == why]
        if details:
            eg = [d for d in details if d][:3]
            parts.append(f'{len(details)} {text.format(images_dir=images_dir)}' + (f' (e.g. {", ".join(eg)})' if eg
                                                                                   else ''))
    return '; '.join(parts)


# ---------------------------------------------------------------------------------------------- the command

def add_args(parser):
    """The Zappos50k flags of get_data.py."""
    g = parser.add_argument_group('zappos')
    a = g.add_argument
    a('--from', dest='from_dir', metavar='DIR',
      help=f'take the archives ({", ".join(ARCHIVES.values())}) from DIR instead of downloading them (default: '
           f'download into --out)')
    a('--triplets', choices=['paper', 'metadata', 'auto'], default='auto',
      help='the paper\'s triplets, triplets drawn from the UT-Zappos50k metadata, or auto: the paper\'s, falling back '
           'to metadata when their link is dead (default: auto)')
    a('--images-url', metavar='URL', default=URLS['images'],
      help=f'where to get {ARCHIVES["images"]} (default: {URLS["images"]})')
    a('--triplets-url', metavar='URL', default=URLS['triplets'],
      help=f'where to get {ARCHIVES["triplets"]} (default: {URLS["triplets"]})')
    a('--metadata-url', metavar='URL', default=URLS['metadata'],
      help=f'where to get {ARCHIVES["metadata"]} (default: {URLS["metadata"]})')
    a('--retries', metavar='N', type=nonneg_int, default=5,
      help='download attempts after the first one fails (default: 5)')
    a('--timeout', metavar='SECONDS', type=positive_float, default=60,
      help='seconds to wait for the server before a retry (default: 60)')
    a('--backoff', metavar='SECONDS', type=nonneg_float, default=2.0,
      help='seconds before the first retry, doubling after each (default: 2.0)')
    a('--max-left-out', metavar='FRACTION', type=fraction, default=0.01,
      help='--triplets metadata: the largest share of meta-data.csv rows that may be left out (no image, a CID that '
           'is not its image\'s name, ...) before the build stops; 1 builds whatever is left (default: 0.01)')
    a('--max-unpacked-gb', metavar='GIB', type=positive_float, default=4.0,
      help=f'stop extracting an archive that unpacks to more than this many GiB, or to more than {MAX_RATIO} times '
           f'its own size (beyond {RATIO_FLOOR >> 20} MiB) (default: 4.0)')


def fraction(text):
    """--max-left-out's type: a number from 0 to 1."""
    try:
        x = float(text)
    except ValueError:
        x = -1.0
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f'expected a fraction from 0 to 1 such as 0.01, got {text!r}')
    return x


def _settings(args):
    return {'seed': args.seed, 'split': args.split,
            'triplets_per_notion': {'train': args.train_triplets, 'val': args.val_triplets,
                                    'test': args.test_triplets}}


def read_record(out):
    try:
        with open(os.path.join(out, RECORD)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def installed(out, triplets, settings):
    """The record of a whole earlier build that matches --triplets (and, for metadata, the settings), else None."""
    record = read_record(out)
    if record is None or not os.path.exists(os.path.join(out, 'filenames.json')):
        return None
    if triplets != 'auto' and record.get('triplets') != triplets:
        return None
    if record.get('triplets') == 'metadata' and record.get('settings') != settings:
        return None
    if any(not os.path.exists(os.path.join(out, 'tripletlists', f'{n}_tripletlist_{s}.txt'))
           for n in ZAPPOS_NOTIONS for s in SPLITS):
        return None
    try:
        return record if not missing_images(out)[1] else None
    except DataError:
        return None


def missing_images(out):
    """(number of images in filenames.json, the paths among them that are not files); DataError if out cannot be read
    as a dataset folder."""
    info = load_dataset_info(out)
    return len(info.filenames), loader_missing_images(info)


def _ours(meta_path):
    """True when there is no dataset.json, or it is the one install_metadata writes."""
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get('name') == 'zappos50k' and meta.get('images') == ZAPPOS_IMAGES


def offline_message(e, urls):
    return (f'cannot reach {e.url} ({str(e).split(": ", 1)[-1]}). If this machine has no internet, download '
            f'{", ".join(urls)} on one that has, put them in one folder (keeping the file names) and run '
            f'`python get_data.py --from FOLDER`')


class _Fetcher:
    """Whole archives by kind: from --from DIR, from an earlier download in out, or downloaded now."""

    def __init__(self, args, out, log):
        self.args, self.out, self.log = args, out, log
        self.urls = {'images': args.images_url, 'triplets': args.triplets_url, 'metadata': args.metadata_url}

    def get(self, kind):
        name, url, a = ARCHIVES[kind], self.urls[kind], self.args
        if a.from_dir:
            path = os.path.join(a.from_dir, name)
            if not os.path.isfile(path):
                raise MissingArchive(f'--from {a.from_dir}: no {name} there; download it from {url}')
            try:
                check_zip(path)
            except BadArchive as e:
                raise BadArchive(f'--from: {e}; download it again from {url}') from None
            return path
        path = os.path.join(self.out, name)
        if os.path.exists(path):
            try:
                check_zip(path)
                return path
            except BadArchive as e:
                self.log(f'{e}; downloading it again')
                os.remove(path)
        for attempt in (1, 2):
            try:
                download(url, path, a.retries, a.timeout, a.backoff, self.log)
            except DownloadError as e:
                if e.unreachable:
                    raise
                raise DownloadError(f'{e}. If the file has moved, pass its new address with --{kind}-url, or '
                                    f'download it by hand into a folder and use --from FOLDER', url) from None
            try:
                check_zip(path)
                return path
            except BadArchive as e:
                os.remove(path)
                if attempt == 2:
                    raise BadArchive(f'{e}; it came broken twice from {url}. Download it by hand and use --from DIR, '
                                     f'or try again later') from None
                self.log(f'{e}; downloading it once more')


def run(args, log=print):
    """get_data.py --dataset zappos: images, then the paper's or metadata triplets, then a check of every image."""
    out = args.out or 'data'
    settings = _settings(args)
    if not args.force:
        done = installed(out, args.triplets, settings)
        if done:
            log(f'{out}: Zappos50k is already there ({done["images"]} images, {done["triplets"]} triplets); '
                f'nothing to do (--force rebuilds it)')
            return out
    if not args.force and not _ours(os.path.join(out, 'dataset.json')):
        raise GetDataError(f'--out {out} holds another dataset (its dataset.json); pick another --out or pass '
                           f'--force to replace it with Zappos50k')
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):                                           # leftovers of killed runs
        if (f.startswith('.') and '.partial-' in f) or f.startswith((f'{ZAPPOS_IMAGES}.old-', 'tripletlists.old-')):
            _remove(os.path.join(out, f))
    _remove(os.path.join(out, RECORD))
    fetch = _Fetcher(args, out, log)
    images_dir = os.path.join(out, ZAPPOS_IMAGES)
    get_images = args.force or not os.path.isdir(images_dir)
    kinds = ['images'] * get_images + {'auto': ['triplets', 'metadata'], 'paper': ['triplets'],
                                       'metadata': ['metadata']}[args.triplets]
    needed = [fetch.urls[k] for k in kinds]                             # for the message when offline
    try:
        if get_images:
            install_images(fetch.get('images'), out, log, args.max_unpacked_gb)
        mode = args.triplets
        if mode in ('paper', 'auto'):
            try:
                zip_path = fetch.get('triplets')
            except (DownloadError, BadArchive, MissingArchive) as e:
                if mode == 'paper':
                    raise
                why = str(e) if isinstance(e, MissingArchive) else f'the link looks dead: {e}'
                log(f'the paper\'s triplets are not available ({why}); falling back to triplets drawn from the '
                    f'UT-Zappos50k metadata (--triplets metadata)')
                mode = 'metadata'
            else:
                install_paper(zip_path, out, log, args.max_unpacked_gb)
                mode = 'paper'
        left_out = None
        if mode == 'metadata':
            left_out = install_metadata(fetch.get('metadata'), out, args, log)[1]
    except DownloadError as e:
        if e.unreachable:
            raise GetDataError(offline_message(e, needed)) from None
        raise
    try:
        n, missing = missing_images(out)
    except DataError as e:
        raise GetDataError(str(e)) from None
    if missing:
        raise GetDataError(f'{len(missing)} of the {n} images named in {os.path.join(out, "filenames.json")} are not '
                           f'under {images_dir}, e.g. {", ".join(missing[:5])}; the images archive may be incomplete: '
                           f'run again with --force to re-extract it' + ('' if mode == 'metadata' else
                                                                         ', or use --triplets metadata'))
    record = {'triplets': mode, 'images': n, 'settings': settings if mode == 'metadata' else None,
              'metadata_rows_left_out': left_out,
              'archives': {k: fetch.urls[k] for k in ('images', 'triplets' if mode == 'paper' else 'metadata')}}
    with atomic_open(os.path.join(out, RECORD)) as f:
        json.dump(record, f, indent=1)
    kept = [name for name in ARCHIVES.values() if os.path.exists(os.path.join(out, name))]
    log(f'{out}: Zappos50k ready ({n} images, {mode} triplets); train with `python main.py --data {out}`'
        + (f'. The downloaded {", ".join(kept)} can be deleted to save space' if kept else ''))
    return out
