"""A trained model as ONNX: images (B, 3, S, S) float32 and notion indices (B,) int64 in, masked embeddings
f(x) * m_c (B, D) out, any batch size. Runs without PyTorch (onnxruntime); see the README for the preprocessing."""
import copy
import json
import os
import warnings

import torch
import torch.nn as nn

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


def export_onnx(trained, path, opset=17):
    """Write trained (a trained.TrainedCSN) to path as ONNX, with its notions, trained notions, image size and
    normalisation in the file's metadata. Returns the metadata dict."""
    try:
        import onnx
    except ImportError:
        raise UserError('--export-onnx needs the onnx package: pip install onnx (and onnxruntime to run the file)') from None
    embedder = MaskedEmbedder(copy.deepcopy(trained.net)).cpu().eval()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    S = trained.image_size
    x, c = torch.zeros(2, 3, S, S), torch.tensor([0, len(trained.notions) - 1])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the TorchScript exporter's deprecation notice; it needs no onnxscript
        torch.onnx.export(embedder, (x, c), path, dynamo=False, opset_version=opset, input_names=['images', 'notions'],
                          output_names=['embeddings'], dynamic_axes={'images': {0: 'batch'}, 'notions': {0: 'batch'},
                                                                     'embeddings': {0: 'batch'}})
    meta = {'notions': trained.notions, 'trained_notions': trained.conditions, 'image_size': S,
            'mean': list(IMAGENET_MEAN), 'std': list(IMAGENET_STD),
            'input': 'RGB, shorter side resized to image_size (bilinear), centre crop, /255, (x - mean) / std, NCHW'}
    model = onnx.load(path)
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=json.dumps(v))
    onnx.save(model, path)
    return meta
