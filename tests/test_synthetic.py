"""csnlib/synthetic.py through get_data.py --dataset synthetic: the Zappos layout with visible labels, built once,
never over a folder it did not build."""
import numpy as np
import pytest
from PIL import Image

import get_data
from conftest import error_line, in_process
from triplet_image_loader import load_dataset_info, load_triplets

ALL = [0, 1, 2, 3]


@pytest.fixture(scope='module')
def zappos(tmp_path_factory):
    root = tmp_path_factory.mktemp('synthetic') / 'zappos'
    assert in_process(get_data.main, ['--dataset', 'synthetic', '--synthetic-images', 48, '--out', root])[0] == 0
    return str(root)


def test_synthetic_writes_the_zappos_layout_with_three_test_triplets_per_test_image(zappos):
    info = load_dataset_info(zappos)  # no dataset.json: read with the Zappos defaults
    assert info.notions == ['class', 'closure', 'gender', 'heel'] and len(info.filenames) == 48
    with Image.open(info.image_path(0)) as im:
        assert im.format == 'JPEG' and im.size == (136, 102)
    test, _ = load_triplets(info, 'test', ALL, 10 ** 9, seed=0)
    train, _ = load_triplets(info, 'train', ALL, 10 ** 9, seed=0)
    assert len(test) == 3 * 48 // 4 and len(np.unique(test)) <= 48 // 4  # 3 triplets per test image
    assert not set(np.unique(test).tolist()) & set(np.unique(train).tolist())  # images split between train and test
    category = lambda i: info.filenames[i].split('/')[0]  # the class notion is Zappos's first folder level
    classes, _ = load_triplets(info, 'train', [0], 10 ** 9, seed=0)
    for a, far, close in classes:
        assert category(a) == category(close) != category(far)

def test_a_second_build_with_the_same_settings_keeps_the_folder_and_other_settings_rebuild_it(zappos):
    code, out, _ = in_process(get_data.main, ['--dataset', 'synthetic', '--synthetic-images', 48, '--out', zappos])
    assert code == 0 and 'already built with the same settings' in out
    code, out, _ = in_process(get_data.main, ['--dataset', 'synthetic', '--synthetic-images', 40, '--out', zappos])
    assert code == 0 and 'wrote 40 synthetic' in out and len(load_dataset_info(zappos).filenames) == 40
    assert in_process(get_data.main, ['--dataset', 'synthetic', '--synthetic-images', 48, '--out', zappos])[0] == 0


def test_a_folder_it_did_not_build_is_refused_and_left_alone(tmp_path):
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
    line = error_line(in_process(get_data.main, ['--dataset', 'synthetic', '--out', tmp_path / 'mine']))
    assert 'was not built by get_data.py' in line and '--force' in line
    assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep me'
    code, _, err = in_process(get_data.main, ['--dataset', 'synthetic', '--synthetic-images', 31])
    assert code == 2 and 'argument --synthetic-images: must be an integer >= 32, got 31' in err
