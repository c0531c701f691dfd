"""Convolutions with a 2x2 output and many channels as one gather and one matmul (XLA:CPU).

XLA:CPU runs a 3x3 convolution whose output is 2x2 and whose input has hundreds of
channels 10-35x slower than eager PyTorch, forward and backward. It is the step time of
a torchvision ResNet at 64x64 inputs, whose last stage works on 2x2 maps. Measured on
2 cores (batch 16, forward plus backward, torch_xla lazy mode):

============================  ==========  ===============  =======
convolution                   XLA conv    gather + matmul  speedup
============================  ==========  ===============  =======
512 -> 512, 2x2, k3           233 ms      18 ms            13x
256 -> 512, 4x4 -> 2x2, k3 s2  32 ms      10 ms            3.3x
256 -> 256, 4x4, k3           6.4 ms      7.5 ms           0.9x
512 -> 512, 1x1, k3           12 ms       19 ms            0.6x
64 -> 64, 2x2, k3             1.5 ms      1.8 ms           0.8x
256 -> 512, 4x4 -> 2x2, k1    1.5 ms      1.7 ms           0.9x
============================  ==========  ===============  =======

So only the slow shape is rewritten: a kernel larger than 1x1, an output of 2 to 4
positions, and at least 2048 input values per output position (channels x kernel).
The rewrite runs on the Dynamo graph, before AOTAutograd, so the backward is derived
from the gather and the matmul (slices, a stack, matmuls), not from
``convolution_backward``, which is as slow. It runs only on the CPU client: TPU graphs
keep torch_xla's convolution. The aten graphs it leads to differ from the unrewritten
ones, so the graph cache keys them apart.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from ._fx import replacing_pass

log = logging.getLogger(__name__)

MAX_OUTPUT_POSITIONS = 4
MIN_OUTPUT_POSITIONS = 2
MIN_VALUES_PER_POSITION = 2048
_CONV2D = (torch.conv2d, F.conv2d)  # how Dynamo records nn.Conv2d and F.conv2d


def conv2d_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     stride: tuple[int, int], padding: tuple[int, int],
                     dilation: tuple[int, int]) -> torch.Tensor:
    """``F.conv2d`` (groups 1) as strided slices of the padded input and one matmul."""
    n, c, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    taps = [padded[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh,
                   j * dw: j * dw + sw * (ow - 1) + 1: sw]
            for i in range(kh) for j in range(kw)]
    columns = torch.stack(taps, dim=2).reshape(n, c * kh * kw, oh * ow)
    out = torch.matmul(weight.reshape(out_channels, c * kh * kw), columns)
    out = out.reshape(n, out_channels, oh, ow)
    return out if bias is None else out + bias.reshape(1, out_channels, 1, 1)


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) for v in value):
        return value[0], value[1]
    return None


def _arguments(node: torch.fx.Node) -> tuple[Any, ...] | None:
    """(x, weight, bias, stride, padding, dilation) of a conv2d call worth rewriting."""
    if node.op != "call_function" or node.target not in _CONV2D:
        return None
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)
    values = list(node.args) + [node.kwargs.get(n, d) for n, d in
                                zip(names[len(node.args):], defaults[len(node.args):])]
    x, weight, bias, stride, padding, dilation, groups = values
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if None in (stride, padding, dilation) or groups != 1:
        return None
    xv = x.meta.get("example_value") if isinstance(x, torch.fx.Node) else None
    wv = weight.meta.get("example_value") if isinstance(weight, torch.fx.Node) else None
    if not isinstance(xv, torch.Tensor) or not isinstance(wv, torch.Tensor) or \
            xv.dim() != 4 or wv.dim() != 4 or not xv.dtype.is_floating_point:
        return None
    try:
        _, c, h, w = (int(s) for s in xv.shape)
        _, _, kh, kw = (int(s) for s in wv.shape)
    except (TypeError, ValueError):  # symbolic sizes: no decision to take here
        return None
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if kh * kw == 1 or not MIN_OUTPUT_POSITIONS <= oh * ow <= MAX_OUTPUT_POSITIONS or \
            c * kh * kw < MIN_VALUES_PER_POSITION:
        return None
    return x, weight, bias, stride, padding, dilation


#: The pass, run on Dynamo graphs for the CPU client only (``backend.py``).
SMALL_CONV_AS_MATMUL = replacing_pass(
    "small_conv_as_matmul", 1, _arguments, conv2d_as_matmul, log,
    "rewrote %d small-output convolution(s) as a gather and a matmul")

__all__ = ["SMALL_CONV_AS_MATMUL", "conv2d_as_matmul"]
