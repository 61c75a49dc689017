"""get_data.py: the triplet rule, the fonts dataset from real installed fonts (filters, labels, splits) and your own
images."""
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import get_data
from conftest import error_line, in_process
from csnlib import dataset_writer
from csnlib.errors import GetDataError, UserError
from triplet_image_loader import check_triplet_file, load_dataset_info, read_labels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FONTS = '/usr/share/fonts'
# file -> what get_data must do with it (installed by setup.sh from fonts/debian-font-packages.txt)
PICKED = {
    'truetype/dejavu/DejaVuSans.ttf': ('DejaVu Sans', 'regular', 'upright'),
    'truetype/dejavu/DejaVuSans-Bold.ttf': ('DejaVu Sans', 'bold', 'upright'),
    'truetype/dejavu/DejaVuSans-Oblique.ttf': ('DejaVu Sans', 'regular', 'italic'),
    'truetype/dejavu/DejaVuSans-BoldOblique.ttf': ('DejaVu Sans', 'bold', 'italic'),
    'truetype/dejavu/DejaVuSerif.ttf': ('DejaVu Serif', 'regular', 'upright'),
    'truetype/dejavu/DejaVuSerif-BoldItalic.ttf': ('DejaVu Serif', 'bold', 'italic'),
    'truetype/dejavu/DejaVuSansMono.ttf': ('DejaVu Sans Mono', 'regular', 'upright'),
    'truetype/dejavu/DejaVuSansMono-Bold.ttf': ('DejaVu Sans Mono', 'bold', 'upright'),
    'fonts-go/Go-Regular.ttf': ('Go', 'regular', 'upright'),
    'fonts-go/Go-Bold-Italic.ttf': ('Go', 'bold', 'italic'),
    'fonts-go/Go-Mono.ttf': ('Go Mono', 'regular', 'upright'),
    'opentype/urw-base35/C059-Roman.otf': ('C059', 'regular', 'upright'),
    'opentype/urw-base35/C059-BdIta.otf': ('C059', 'bold', 'italic'),
    'truetype/croscore/Arimo-Regular.ttf': ('Arimo', 'regular', 'upright'),
}
DROPPED = {
    'truetype/liberation2/LiberationSans-Regular.ttf': 'pixel_clone',    # the same drawing as Arimo Regular
    'fonts-go/Go-Smallcaps.ttf': 'caps_only',
    'opentype/bwht/BecauseWeBuild-Regular.otf': 'caps_only',           # capitals in the lower case; the name is silent
    'truetype/ubuntu-title/Ubuntu-Title.ttf': 'caps_only',              # unicase: the capitals are lower-case shapes
    'truetype/lyx/cmsy10.ttf': 'symbol_font',
    'opentype/bodoni-classic/GFSBodoniClassic.otf': 'missing_chars',     # Greek only in the Latin slots
    'X11/Type1/C059-Roman.pfb': 'type1_copy',                           # C059-Roman.otf is the same font
}


def test_sample_triplets_follow_the_rule_and_never_repeat():
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 4, 300)                                    # -1: unknown, never used
    trip = dataset_writer.sample_triplets(codes, 5000, np.random.default_rng(1))
    assert trip.shape == (5000, 3)
    a, f, c = trip.T
    assert (codes[a] == codes[c]).all() and (a != c).all()             # anchor and close share the label
    assert (codes[f] != codes[a]).all() and (codes[f] >= 0).all()      # far has another, known one
    assert len({tuple(t) for t in trip.tolist()}) == len(trip)


def test_sample_triplets_stops_at_what_the_images_allow():
    codes = np.array([0, 0, 0, 1, 1, -1, 2])
    # anchors with a partner: 3 of label 0 (2 closes, 3 fars each) + 2 of label 1 (1 close, 4 fars each)
    trip = dataset_writer.sample_triplets(codes, 1000, np.random.default_rng(0))
    assert len(trip) == 3 * 2 * 3 + 2 * 1 * 4
    assert len(dataset_writer.sample_triplets(np.array([0, 0, -1]), 10, np.random.default_rng(0))) == 0   # one label


def test_split_groups_keeps_groups_whole_and_every_split_has_two():
    groups = [f'g{i // 5}' for i in range(40)]                          # 8 groups of 5
    split = dataset_writer.split_groups(groups, (0.8, 0.1, 0.1), seed=3)
    by_group = {}
    for g, s in zip(groups, split):
        by_group.setdefault(g, set()).add(s)
    assert all(len(s) == 1 for s in by_group.values())
    assert sorted(list(split).count(s) // 5 for s in ('train', 'val', 'test')) == [2, 2, 4]
    assert list(dataset_writer.split_groups(groups, (0.8, 0.1, 0.1), seed=3)) == list(split)


@pytest.fixture(scope='module')
def fonts_data(tmp_path_factory):
    """A fonts dataset built from copies of a few installed fonts that exercise every filter."""
    src = tmp_path_factory.mktemp('fontfiles')
    missing = [p for p in list(PICKED) + list(DROPPED) if not os.path.exists(os.path.join(FONTS, p))]
    assert not missing, f'fonts missing: {missing}; install them with `bash setup.sh`'
    for p in list(PICKED) + list(DROPPED):
        shutil.copy(os.path.join(FONTS, p), src / os.path.basename(p))
    out = tmp_path_factory.mktemp('ds') / 'fonts'
    argv = ['--dataset', 'fonts', '--no-system-fonts', '--font-dir', str(src), '--out', str(out),
            '--train-triplets', '3000', '--val-triplets', '500', '--test-triplets', '500', '--split', '0.5,0.25,0.25']
    get_data.main(argv)
    return src, out, argv


@pytest.mark.slow
def test_fonts_filters_keep_the_letters_and_say_why_the_rest_went(fonts_data):
    src, out, _ = fonts_data
    with open(out / 'manifest.json') as f:
        man = json.load(f)
    kept = {os.path.basename(k['path']): k for k in man['kept']}
    dropped = {os.path.basename(d['path']): d['drop'] for d in man['dropped']}
    clone_pair = {'Arimo-Regular.ttf', 'LiberationSans-Regular.ttf'}
    for p, reason in DROPPED.items():
        name = os.path.basename(p)
        if name in clone_pair:                                          # one of the two is kept, the other dropped
            assert len(clone_pair & set(kept)) == 1 and len(clone_pair & set(dropped)) == 1
            assert dropped[(clone_pair - set(kept)).pop()] == 'pixel_clone'
        else:
            assert dropped.get(name) == reason, (name, dropped.get(name))
    for p, (family, weight, slant) in PICKED.items():
        name = os.path.basename(p)
        if name in clone_pair and name not in kept:
            continue
        assert name in kept, (name, dropped.get(name))
        assert (kept[name]['family'], kept[name]['weight'], kept[name]['slant']) == (family, weight, slant)
        with open(src / name, 'rb') as f:
            assert kept[name]['sha256'] == hashlib.sha256(f.read()).hexdigest()
    assert man['counts']['images'] == 62 * len(kept)


@pytest.mark.slow
def test_fonts_layout_is_what_main_reads(fonts_data):
    _, out, _ = fonts_data
    info = load_dataset_info(str(out))
    assert info.notions == ['character', 'font', 'weight', 'slant']
    assert info.hflip is False and json.load(open(out / 'dataset.json'))['hflip'] is False  # a mirrored b is a d
    labels = read_labels(info)
    with open(out / 'labels.csv') as f:
        split = [r['split'] for r in csv.DictReader(f)]
    im = Image.open(info.image_path(0))
    assert im.size == (64, 64) and im.mode == 'L'
    assert labels['character'][:3] == ['A', 'B', 'C']
    fonts_of = {s: {fam for fam, sp in zip(labels['font'], split) if sp == s} for s in ('train', 'val', 'test')}
    assert not fonts_of['train'] & fonts_of['test'] and not fonts_of['train'] & fonts_of['val']   # unseen test fonts
    for ni, notion in enumerate(info.notions):
        for s in ('train', 'val', 'test'):
            trip, _, problems = check_triplet_file(info.triplet_file(notion, s), len(info.filenames))
            assert not problems and len(trip) > 0
            lab = np.array(labels[notion], dtype=object)
            a, f, c = trip.T
            assert (lab[a] == lab[c]).all() and (lab[a] != lab[f]).all()
            assert {split[i] for i in np.unique(trip)} == {s}            # a split's triplets use its own images
    assert os.path.getsize(out / 'contact_sheet.png') > 10000


@pytest.mark.slow
def test_fonts_second_run_does_nothing_and_main_checks_the_data(fonts_data, capsys):
    _, out, argv = fonts_data
    before = os.path.getmtime(out / 'manifest.json')
    get_data.main(argv)
    assert 'already built' in capsys.readouterr().out
    assert os.path.getmtime(out / 'manifest.json') == before
    r = subprocess.run([sys.executable, 'main.py', '--data', str(out), '--check-data', '--num_traintriplets', '2000',
                        '--num_valtriplets', '400', '--num_testtriplets', '400'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_fonts_refuses_a_folder_it_did_not_build(tmp_path):
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'thesis.tex').write_text('precious')
    with pytest.raises(GetDataError, match='not built by get_data.py'):
        get_data.main(['--dataset', 'fonts', '--out', str(tmp_path / 'mine')])
    assert (tmp_path / 'mine' / 'thesis.tex').read_text() == 'precious'


# ------------------------------------------------------------------------------------------------ your own images

def make_shop(root, n=60):
    """n small images with a colour and a shape column; some cells empty."""
    rows = []
    colours = {'red': (220, 30, 30), 'blue': (30, 30, 220), 'green': (30, 200, 30)}
    for i in range(n):
        colour = list(colours)[i % 3]
        shape = ['round', 'square'][(i // 3) % 2]
        os.makedirs(root / 'img' / shape, exist_ok=True)
        Image.new('RGB', (20, 20), colours[colour]).save(root / 'img' / shape / f'{i}.jpg')
        rows.append([f'{shape}/{i}.jpg', '' if i % 10 == 0 else colour, shape])
    with open(root / 'shop.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['path', 'colour', 'shape'])
        w.writerows(rows)
    return rows


@pytest.mark.slow
def test_attributes_build_and_missing_values_only_leave_that_notion(tmp_path):
    rows = make_shop(tmp_path)
    out = tmp_path / 'ds'
    get_data.main(['--dataset', 'attributes', '--images', str(tmp_path / 'img'), '--attributes',
                   str(tmp_path / 'shop.csv'), '--out', str(out), '--train-triplets', '400', '--val-triplets', '50',
                   '--test-triplets', '50'])
    info = load_dataset_info(str(out))
    assert info.notions == ['colour', 'shape'] and info.filenames == [r[0] for r in rows]
    assert info.hflip is True                                           # no --no-hflip: mirrors keep the labels
    labels = read_labels(info)
    unlabelled = {i for i, r in enumerate(rows) if r[1] == ''}
    colour_images, shape_images = set(), set()
    for notion, used in (('colour', colour_images), ('shape', shape_images)):
        for s in ('train', 'val', 'test'):
            trip, _, problems = check_triplet_file(info.triplet_file(notion, s), len(rows))
            assert not problems
            lab = np.array(labels[notion], dtype=object)
            assert (lab[trip[:, 0]] == lab[trip[:, 2]]).all() and (lab[trip[:, 0]] != lab[trip[:, 1]]).all()
            used.update(np.unique(trip).tolist())
    assert not colour_images & unlabelled                               # left out of colour ...
    assert shape_images & unlabelled                                    # ... but still used for shape
    assert os.path.exists(info.image_path(0))


@pytest.mark.slow
def test_attributes_no_hflip_is_written_for_main_to_follow(tmp_path):
    make_shop(tmp_path)
    out = tmp_path / 'ds'
    get_data.main(['--dataset', 'attributes', '--images', str(tmp_path / 'img'), '--attributes',
                   str(tmp_path / 'shop.csv'), '--out', str(out), '--train-triplets', '40', '--val-triplets', '20',
                   '--test-triplets', '20', '--no-hflip'])
    assert json.load(open(out / 'dataset.json'))['hflip'] is False and load_dataset_info(str(out)).hflip is False


@pytest.mark.parametrize('problem, message', [
    ('unknown', 'square/nope.jpg: not found'),
    ('broken', 'unreadable'),
    ('column', 'notion column(s) size not in the header'),
    ('duplicate', 'listed again (first on line 2)'),
])
@pytest.mark.slow
def test_attributes_bad_input_names_the_file_and_writes_nothing(tmp_path, capsys, problem, message):
    rows = make_shop(tmp_path, 12)
    extra = []
    if problem == 'unknown':
        rows.append(['square/nope.jpg', 'red', 'square'])
    elif problem == 'broken':
        (tmp_path / 'img' / 'round' / '0.jpg').write_bytes(b'not a jpeg')
    elif problem == 'column':
        extra = ['--notions', 'colour', 'size']
    elif problem == 'duplicate':
        rows.append(rows[0])
    with open(tmp_path / 'shop.csv', 'w', newline='') as f:
        csv.writer(f).writerows([['path', 'colour', 'shape']] + rows)
    with pytest.raises(GetDataError) as e:
        get_data.main(['--dataset', 'attributes', '--images', str(tmp_path / 'img'), '--attributes',
                       str(tmp_path / 'shop.csv'), '--out', str(tmp_path / 'ds')] + extra)
    assert message in str(e.value) and 'shop.csv' in str(e.value)
    assert not (tmp_path / 'ds').exists()


def attributes(tmp_path, *extra):
    return ['--dataset', 'attributes', '--images', str(tmp_path / 'img'), '--attributes', str(tmp_path / 'shop.csv'),
            '--out', str(tmp_path / 'ds'), '--train-triplets', '40', '--val-triplets', '20', '--test-triplets', '20',
            *extra]


@pytest.mark.parametrize('header, message', [
    (['path', '../../colour', 'shape'], "notion column '../../colour' cannot be a notion name: it holds a \"/\""),
    (['path', 'colour', '..'], "notion column '..' cannot be a notion name: it holds \"..\""),
    (['path', 'col\\our', 'shape'], "notion column 'col\\\\our' cannot be a notion name: it holds a \"\\\""),
    (['path', 'colour', ''], "notion column '' cannot be a notion name: it is empty"),
    (['path', 'colour', 'colour'], "shop.csv:1: column(s) 'colour' appear twice in the header"),
])
def test_a_csv_header_that_cannot_name_a_notion_stops_the_build_and_nothing_is_written(tmp_path, header, message):
    rows = make_shop(tmp_path, 12)
    with open(tmp_path / 'shop.csv', 'w', newline='') as f:
        csv.writer(f).writerows([header] + rows)
    with pytest.raises(GetDataError) as e:
        get_data.main(attributes(tmp_path))
    assert message in str(e.value) and 'shop.csv' in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ['img', 'shop.csv']        # nothing written, inside or outside --out


def test_a_latin1_csv_names_its_line_and_says_to_save_it_as_utf8(tmp_path):
    rows = make_shop(tmp_path, 12)
    rows[4][1] = 'rouge foncé'
    with open(tmp_path / 'shop.csv', 'w', newline='', encoding='latin-1') as f:
        csv.writer(f).writerows([['path', 'colour', 'shape']] + rows)
    code, _, err = in_process(get_data.main, attributes(tmp_path))
    assert error_line((code, '', err)) == ('error: ' + str(tmp_path / 'shop.csv') + ':6: not UTF-8 text (byte 0xe9, '
                                           'invalid continuation byte); save the CSV as UTF-8 (e.g. "CSV UTF-8" in a '
                                           'spreadsheet)')


def test_an_image_path_or_link_out_of_images_is_refused(tmp_path):
    rows = make_shop(tmp_path, 12)
    Image.new('RGB', (20, 20), (1, 2, 3)).save(tmp_path / 'secret.jpg')
    os.symlink(tmp_path / 'secret.jpg', tmp_path / 'img' / 'round' / 'link.jpg')
    for bad in ('../secret.jpg', str(tmp_path / 'secret.jpg'), 'round/link.jpg'):
        with open(tmp_path / 'shop.csv', 'w', newline='') as f:
            csv.writer(f).writerows([['path', 'colour', 'shape']] + rows + [[bad, 'red', 'round']])
        with pytest.raises(GetDataError, match='shop.csv: 1 image') as e:
            get_data.main(attributes(tmp_path))
        assert ('outside --images (a symbolic link)' if bad.endswith('link.jpg')
                else 'must be a path inside --images') in str(e.value)
    assert not (tmp_path / 'ds').exists()


def test_attributes_dataset_json_names_a_folder_inside_out_that_links_to_the_images(tmp_path):
    rows = make_shop(tmp_path, 30)
    get_data.main(attributes(tmp_path))
    meta = json.load(open(tmp_path / 'ds' / 'dataset.json'))
    assert meta['images'] == 'images' and os.path.realpath(tmp_path / 'ds' / 'images') == str(tmp_path / 'img')
    info = load_dataset_info(str(tmp_path / 'ds'))
    assert info.image_path(3) == str(tmp_path / 'ds' / 'images' / rows[3][0]) and os.path.isfile(info.image_path(3))
    assert read_labels(info, log=pytest.fail)['colour'] == [r[1] for r in rows]
    get_data.main(attributes(tmp_path, '--force'))                    # a rebuild replaces the link, not the images
    assert len(os.listdir(tmp_path / 'img' / 'round')) == 15


def test_get_data_errors_are_one_line_with_status_2(tmp_path):
    """get_data.py as its command line runs it (run_script): error: MESSAGE, exit status 2, no traceback."""
    code, _, err = in_process(get_data.main, ['--dataset', 'attributes', '--out', str(tmp_path / 'x')])
    assert error_line((code, '', err)) == 'error: --dataset attributes needs --images DIR and --attributes FILE.csv'
    code, _, err = in_process(get_data.main, ['--dataset', 'fonts', '--no-system-fonts', '--font-dir',
                                              str(tmp_path / 'nope'), '--out', str(tmp_path / 'f')])
    assert error_line((code, '', err)) == f'error: --font-dir {tmp_path / "nope"}: no such folder'
    with pytest.raises(GetDataError, match='no font folder: --no-system-fonts needs --font-dir DIR'):
        get_data.main(['--dataset', 'fonts', '--no-system-fonts', '--out', str(tmp_path / 'f')])


def test_get_data_library_code_never_exits_the_process():
    import csnlib.dataset_writer
    import csnlib.fonts
    import csnlib.zappos
    for mod in (get_data, csnlib.fonts, csnlib.zappos, csnlib.dataset_writer):
        src = open(mod.__file__).read()
        body = src.split("if __name__ == '__main__':")[0]
        assert 'sys.exit' not in body and 'SystemExit' not in body, mod.__name__
    assert issubclass(GetDataError, UserError)                         # printed by run_script as one line
