"""A trained model as ONNX: images (B, 3, S, S) float32 and notion indices (B,) int64 in, masked embeddings
f(x) * m_c (B, D) out, any batch size. Runs without PyTorch (onnxruntime); see the README for the preprocessing."""
import copy
import json
import os
import warnings

import torch
import torch.nn as nn

from csnlib.atomic import atomic_path
from csnlib.options import UserError
from triplet_image_loader import IMAGENET_MEAN, IMAGENET_STD


class MaskedEmbedder(nn.Module):
    """(images, notions) -> masked embeddings, with no data-dependent control flow: task-specific networks run every
    notion's network on every image and keep each image's own (C times the work of one network)."""

    def __init__(self, net):
        super().__init__()
        self.net = net  # the TripletNet's embednet
        w = net.mask_weights()
        self.register_buffer('masks', None if w is None else w.detach().float().clone())  # (C, D), ReLU applied

    def forward(self, x, c):  # x (B, 3, S, S), c (B,) int64
        if self.net.per_notion_backbone:
            emb = torch.stack([n(x) for n in self.net.nets], 1)  # (B, C, D)
            return emb.gather(1, c.view(-1, 1, 1).expand(-1, 1, emb.shape[2])).squeeze(1)  # (B, D)
        emb = self.net.embed(x)  # (B, D)
        return emb if self.masks is None else emb * self.masks[c]  # (B, D)


def check_target(path, source=None):
    """Refuse an --export-onnx path that is a folder, or the checkpoint being read (source: the same path or the same
    file under another name)."""
    if os.path.isdir(path) or path.endswith(('/', os.sep)):
        raise UserError(f'--export-onnx {path}: a folder; give a file name, e.g. {os.path.join(path, "csn.onnx")}')
    if source is not None and os.path.exists(path) and os.path.exists(source) and os.path.samefile(path, source):
        raise UserError(f'--export-onnx {path}: that is the checkpoint --resume {source} it is made from; writing '
                        f'there would replace the checkpoint. Give another file name, e.g. '
                        f'{os.path.splitext(os.path.abspath(source))[0]}.onnx')
    if os.path.isfile(path) and not is_onnx(path):
        raise UserError(f'--export-onnx {path}: a file that is not an ONNX model is there (a checkpoint, or another '
                        f'file): it is not replaced. Give another file name, e.g. '
                        f'{os.path.splitext(os.path.abspath(source or path))[0].removesuffix(".pth")}.onnx, or remove '
                        f'that file first')


def is_onnx(path):
    """Whether the file starts as an ONNX model does (its protobuf's first field, ir_version: 0x08); an empty file
    counts as one (nothing to lose). Checkpoints start otherwise (a zip's PK, a pickle's 0x80)."""
    with open(path, 'rb') as f:
        head = f.read(1)
    return head in (b'', b'\x08')


def export_onnx(trained, path, opset=17, source=None):
    """Write trained (a trained.TrainedCSN) to path as ONNX, with its notions, trained notions, image size and
    normalisation in the file's metadata: whole or not at all (a temporary file renamed), never onto a folder or onto
    source, the checkpoint it was loaded from. Returns the metadata dict."""
    try:
        import onnx
    except ImportError:
        raise UserError('--export-onnx needs the onnx package: pip install onnx '
                        '(and onnxruntime to run the file)') from None
    check_target(path, source)
    embedder = MaskedEmbedder(copy.deepcopy(trained.net)).cpu().eval()
    S = trained.image_size
    x, c = torch.zeros(2, 3, S, S), torch.tensor([0, len(trained.notions) - 1])
    meta = {'notions': trained.notions, 'trained_notions': trained.conditions, 'image_size': S,
            'mean': list(IMAGENET_MEAN), 'std': list(IMAGENET_STD),
            'input': 'RGB, shorter side resized to image_size (bilinear), centre crop, /255, (x - mean) / std, NCHW'}
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_path(path) as tmp:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')  # the TorchScript exporter's deprecation notice; it needs no onnxscript
                torch.onnx.export(embedder, (x, c), tmp, dynamo=False, opset_version=opset,
                                  input_names=['images', 'notions'], output_names=['embeddings'],
                                  dynamic_axes={'images': {0: 'batch'}, 'notions': {0: 'batch'},
                                                'embeddings': {0: 'batch'}})
            model = onnx.load(tmp)
            for k, v in meta.items():
                model.metadata_props.add(key=k, value=json.dumps(v))
            onnx.save(model, tmp)
    except OSError as e:
        raise UserError(f'--export-onnx {path}: cannot write it ({e.strerror or e}); choose a folder you can write '
                        f'to') from None
    return meta
