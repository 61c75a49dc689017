"""A convolution's weight gradient as one matrix product over its input's patches, for the small feature maps of 32
and 64 px images: on the CPU, oneDNN's weight-gradient kernel is slow there (at 2x2 and 4x4 output positions in bf16
it ran 1.8 to 10 times as long as the matrix product on an Intel Xeon with AMX; README, "Small images"). On 2x2 maps
the forward pass is the same product; elsewhere it, and everywhere the input's gradient, stay oneDNN's; evaluation
never goes through here."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from csnlib.runtime import cpu_has_amx

MAX_POSITIONS = 16  # output positions (Ho * Wo) up to which the matrix product is used: 4x4 maps and smaller
FORWARD_POSITIONS = 4  # and up to which the forward pass is a matrix product too: 2x2 maps (1.6 to 5x oneDNN's there)


def output_size(x, k, stride, padding):
    """The output map's height and width of a k x k convolution of x (N, C, H, W)."""
    return tuple((n + 2 * padding - k) // stride + 1 for n in x.shape[-2:])


def patches(x, k, stride, padding, out_hw):
    """The k x k patches of x (N, C, H, W) under each output position, channels last: (N * Ho * Wo, k * k * C)."""
    ho, wo = out_hw
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, padding, padding, padding, padding))  # (N, H + 2p, W + 2p, C)
    n, _, _, c = xp.shape
    sn, sh, sw, sc = xp.stride()
    view = xp.as_strided((n, ho, wo, k, k, c), (sn, stride * sh, stride * sw, sh, sw, sc))  # (N, Ho, Wo, k, k, C)
    return view.reshape(n * ho * wo, k * k * c)


def weight_grad(gy, x, k, stride, padding, cols=None):
    """d(loss)/d(weight) of conv2d(x, weight) (no groups, no dilation) from gy = d(loss)/d(output) (N, O, Ho, Wo):
    the sum over images and positions of gy's column times the patch under it, one matrix product (cols: x's
    patches, when the forward pass made them)."""
    o, ho, wo = gy.shape[1:]
    g = gy.permute(0, 2, 3, 1).reshape(-1, o)  # (N * Ho * Wo, O)
    gw = g.t() @ (patches(x, k, stride, padding, (ho, wo)) if cols is None else cols)  # (O, k * k * C)
    return gw.reshape(o, k, k, -1).permute(0, 3, 1, 2)  # (O, C, k, k)


class _PatchGradConv(torch.autograd.Function):
    """conv2d whose backward takes the input's gradient from oneDNN and the weight's from one matrix product over
    the patches; on maps of FORWARD_POSITIONS or fewer the forward pass is that product too (and keeps its patches)."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        k = weight.shape[-1]
        ho, wo = output_size(x, k, stride, padding)
        ctx.stride, ctx.padding = stride, padding
        if ho * wo > FORWARD_POSITIONS:
            ctx.save_for_backward(x, weight, None)
            return F.conv2d(x, weight, None, stride, padding)
        cols = patches(x, k, stride, padding, (ho, wo))  # (N * Ho * Wo, k * k * C)
        ctx.save_for_backward(x, weight, cols)
        y = cols @ weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).t()  # (N * Ho * Wo, O)
        return y.reshape(x.shape[0], ho, wo, -1).permute(0, 3, 1, 2)  # (N, O, Ho, Wo), channels last

    @staticmethod
    def backward(ctx, gy):
        x, weight, cols = ctx.saved_tensors
        s, p = ctx.stride, ctx.padding
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(gy, x, weight, None, (s, s), (p, p), (1, 1), False, (0, 0), 1,
                                                     (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            gw = weight_grad(gy, x, weight.shape[-1], s, p, cols).to(weight.dtype)
        return gx, gw, None, None


class PatchGradConv2d(nn.Conv2d):
    """nn.Conv2d (square kernel, one stride and padding, no bias, groups or dilation) whose training step on the CPU
    takes the weight gradient from one matrix product where the output map has at most MAX_POSITIONS positions and
    the arithmetic is in one of `dtypes` (autocast's dtype, or the weight's); elsewhere nn.Conv2d itself."""

    def __init__(self, conv, dtypes):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False,
                         device='meta')
        self.weight = conv.weight  # the same Parameter: state_dict and optimizer see no change
        self.dtypes = dtypes

    def forward(self, x):
        if not (self.training and torch.is_grad_enabled() and x.device.type == 'cpu'):
            return super().forward(x)
        k, s, p = self.kernel_size[0], self.stride[0], self.padding[0]
        ho, wo = output_size(x, k, s, p)
        cast = torch.get_autocast_dtype('cpu') if torch.is_autocast_enabled('cpu') else None
        if ho * wo > MAX_POSITIONS or (cast or self.weight.dtype) not in self.dtypes:
            return super().forward(x)
        if cast is None:
            return _PatchGradConv.apply(x, self.weight, s, p)
        with torch.autocast('cpu', enabled=False):  # autocast's casts, made here so that autograd sees them
            return _PatchGradConv.apply(x.to(cast), self.weight.to(cast), s, p)


def fits(conv):
    return (type(conv) is nn.Conv2d and conv.bias is None and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding_mode == 'zeros' and isinstance(conv.padding, tuple)
            and conv.kernel_size[0] == conv.kernel_size[1] and conv.stride[0] == conv.stride[1]
            and conv.padding[0] == conv.padding[1])


def dtypes_for(choice, device, amx=None):
    """The precisions in which the matrix product is used: auto = bf16 on a CPU with AMX (where it was measured; in
    fp32 it gained 1.02x, and a CPU without AMX could not be measured), matmul = bf16 and fp32, onednn = none."""
    if device.type != 'cpu' or choice == 'onednn':
        return ()
    if choice == 'matmul':
        return (torch.bfloat16, torch.float32)
    return (torch.bfloat16,) if (cpu_has_amx() if amx is None else amx) else ()


def install(model, dtypes):
    """Puts PatchGradConv2d in place of every fitting nn.Conv2d of model, sharing its weight; returns how many."""
    if not dtypes:
        return 0
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if fits(child):
                setattr(parent, name, PatchGradConv2d(child, dtypes))
                n += 1
    return n


def describe(dtypes):
    """The start line's words for the choice."""
    if not dtypes:
        return 'oneDNN'
    names = ' and '.join({torch.bfloat16: 'bf16', torch.float32: 'fp32'}[d] for d in dtypes)
    return f'one matmul on maps of {MAX_POSITIONS} positions or fewer in {names}'
