"""onnx_export.py: the exported model in onnxruntime against PyTorch at two batch sizes (a CSN with learned masks,
task-specific networks), docs/using.md's PyTorch-free example, and retrieve.py --export-onnx."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_trained_csn import hub_load, images

from conftest import REPO, save_checkpoint

ort = pytest.importorskip('onnxruntime')


def export(tmp_path, variant, conditions=(0, 1)):
    from csnlib.onnx_export import export_onnx
    model = hub_load(save_checkpoint(tmp_path / 'm.pth', variant, conditions=conditions))
    path = str(tmp_path / 'm.onnx')
    export_onnx(model, path)
    return model, ort.InferenceSession(path, providers=['CPUExecutionProvider'])


@pytest.mark.slow
@pytest.mark.parametrize('variant', [['--learned'], ['--model', 'task']])
def test_onnxruntime_matches_pytorch_at_two_batch_sizes(tmp_path, variant):
    model, sess = export(tmp_path, variant)
    x = torch.stack([model.transform(im) for im in images(7)])
    for B in (1, 7):
        c = torch.tensor([0, 1, 1, 0, 1, 0, 0][:B])
        got = sess.run(None, {'images': x[:B].numpy(), 'notions': c.numpy()})[0]
        want = torch.cat([model.embed(x[i:i + 1], int(c[i])) for i in range(B)]).numpy()  # each image's own notion
        assert got.shape == want.shape == (B, 64)
        assert np.abs(got - want).max() < 1e-4
    meta = {k: json.loads(v) for k, v in sess.get_modelmeta().custom_metadata_map.items()}
    assert meta['notions'] == ['colour', 'shape'] and meta['image_size'] == 32 and meta['trained_notions'] == [0, 1]


def readme_example():
    """docs/using.md's code block under 'Run the exported model without PyTorch'."""
    text = open(os.path.join(REPO, 'docs', 'using.md')).read()
    section = text.split('Run the exported model without PyTorch', 1)[1]
    block = re.search(r'\n((?:    .*\n)(?:    .*\n|\n)*)', section).group(1)  # the first indented block
    return '\n'.join(line[4:] for line in block.splitlines())


@pytest.mark.slow
def test_the_readmes_example_runs_without_pytorch(tmp_path):
    model, _ = export(tmp_path, ['--learned'])
    os.rename(tmp_path / 'm.onnx', tmp_path / 'csn.onnx')
    ims = images(2, seed=3)
    for im, name in zip(ims, ('a.png', 'b.png')):
        im.convert('L').save(tmp_path / name)  # grey: converted to RGB as the transform does
    code = readme_example().replace("'font'", "'shape'")
    assert 'import torch' not in code and 'sess.run' in code
    env = dict(os.environ, PYTHONPATH='')
    p = subprocess.run([sys.executable, '-c', 'import sys; sys.modules["torch"] = None\n' + code], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    x = torch.stack([model.transform(str(tmp_path / n)) for n in ('a.png', 'b.png')])
    want = model.distance(x[:1], x[1:], 'shape').item()
    assert float(p.stdout.split()[-1]) == pytest.approx(want, rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_retrieve_py_exports_onnx(tmp_path):
    ckpt = save_checkpoint(tmp_path / 'm.pth', ['--model', 'task'])
    out = tmp_path / 'out' / 'csn.onnx'
    p = subprocess.run([sys.executable, os.path.join(REPO, 'retrieve.py'), '--resume', ckpt, '--export-onnx', out],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert out.exists() and 'csn.onnx' in p.stdout
    sess = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    assert sess.run(None, {'images': np.zeros((3, 3, 32, 32), np.float32), 'notions': np.array([0, 1, 0])})[0].shape \
        == (3, 64)


# ------------------------------------------------------------------------- where --export-onnx writes, and how

def export_cli(*args):
    import retrieve as r
    from conftest import in_process
    return in_process(r.main, ['--export-onnx', *args])


def test_export_onnx_refuses_the_checkpoint_it_reads_under_any_name(tmp_path):
    from csnlib.errors import UserError
    from csnlib.onnx_export import export_onnx
    ckpt = save_checkpoint(tmp_path / 'm.pth.tar', [])
    model = hub_load(ckpt)
    before = open(ckpt, 'rb').read()
    os.link(ckpt, tmp_path / 'hard.onnx')
    os.symlink(ckpt, tmp_path / 'soft.onnx')
    for target in (ckpt, tmp_path / 'hard.onnx', tmp_path / 'soft.onnx', f'{tmp_path}/./m.pth.tar'):
        with pytest.raises(UserError, match=f'^--export-onnx {target}: that is the checkpoint --resume {ckpt} it is '
                                            f'made from; writing there would replace the checkpoint'):
            export_onnx(model, str(target), source=ckpt)
    assert open(ckpt, 'rb').read() == before and sorted(os.listdir(tmp_path)) == ['hard.onnx', 'm.pth.tar', 'soft.onnx']


def test_export_onnx_to_a_folder_is_one_line(tmp_path):
    from conftest import error_line
    ckpt = save_checkpoint(tmp_path / 'm.pth.tar', [])
    (tmp_path / 'out').mkdir()
    for target in (tmp_path / 'out', f'{tmp_path}/new/'):
        line = error_line(export_cli(target, '--resume', ckpt))
        assert line.startswith(f'error: --export-onnx {target}: a folder; give a file name, e.g. '), line
    assert os.listdir(tmp_path / 'out') == [] and not (tmp_path / 'new').exists()


def test_a_killed_export_leaves_the_old_file_whole_and_no_temporary_file(tmp_path, monkeypatch):
    """torch.onnx.export writes part of the file and is interrupted: the file already there is untouched."""
    from csnlib import onnx_export
    model = hub_load(save_checkpoint(tmp_path / 'm.pth', []))
    (tmp_path / 'out').mkdir()
    target = tmp_path / 'out' / 'csn.onnx'
    target.write_bytes(b'\x08 the previous export')  # an ONNX file's first byte: a file that export may replace

    def interrupted(module, args, f, **kw):
        open(f, 'wb').write(b'half a model')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch.onnx, 'export', interrupted)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(model, str(target))
    assert target.read_bytes() == b'\x08 the previous export' and os.listdir(tmp_path / 'out') == ['csn.onnx']
