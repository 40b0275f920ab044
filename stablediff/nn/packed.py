"""Convolutions (and bf16 linear layers) whose weights are put in oneDNN's own blocked layout once, not at every
call, for inference on the CPU: bf16, and fp32 on channels-last inputs (devices.weight_layout).

F.conv2d hands oneDNN the weight in PyTorch's layout, and oneDNN reorders it into the blocked one its kernels read
at every call: a pass over the weight that costs most where the weight is large and the image small. Over SD 1.5's
16x16 latents (1280 channels, batch 2) on a 2-core AVX512-BF16 EPYC, a 3x3 convolution took 21.8 ms that way
against 17.9 ms on its weight packed once, 694 against 841 GFLOP/s; 17.9 against 17.2 ms at 32x32, 640 channels.
The packed copy is kept beside the weight (one per convolution, for the last input shape it ran on) and made again
when the weight changes (a LoRA merged in place), the input's shape does, or the weight moves. Channels-last in,
channels-last out, the same oneDNN kernels: bit for bit the result of F.conv2d on channels-last bf16 tensors
(tests/test_layers.py), except the wide convolutions that go in parts (PART), within a rounding."""
import weakref

import torch
import torch.nn.functional as F
from torch import nn


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a convolution of x by weight goes by a packed weight: where a product would run on oneDNN
    (layers.on_onednn: CPU inference in fp32 or bf16, outside torch.compile), on 4-D inputs, fp32 ones only
    channels-last."""
    from stablediff.nn.layers import on_onednn

    return (on_onednn(x, weight) and x.dim() == 4
            and (x.dtype == torch.bfloat16 or layout(x) == torch.channels_last))


def layout(x: torch.Tensor) -> torch.memory_format:
    """x's memory format: channels-last, or contiguous for everything else."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


# A stride-1 3x3 convolution over more than PART input channels goes as parts of at most PART of them, each part's
# products added to the parts' before it as oneDNN writes its output (the binary add of `plus`). On a 2-core Xeon
# with AMX, oneDNN's direct convolutions ran SD 1.5's wide layers faster in parts, in one guided 512x512 step (batch
# 2, in turn with the whole ones): fp32 1280 to 1280 channels at 16x16 264 against 288 ms (7 layers), 2560 to 1280
# 167 against 225 ms (2 layers), all direct convolutions 1.22 against 1.37 s; bf16 43 against 57 ms, 26 against
# 30 ms, 1280 to 640 at 32x32 11.6 against 14.2 ms, all 386 against 414 ms. Neither gained in 1x1 or 2x2 layers. In
# bf16 each part's sum is rounded before the next adds to it (about one more rounding of the output).
PART = 640


def conv2d(owner: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
           dilation=(1, 1), groups: int = 1, add: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups) on weight packed once, the packed copy kept on
    `owner` (see the module's text), in parts of input channels where it is wide (PART), plus `add` (a residual of
    the output's shape) where given: on packed weights oneDNN adds it as each output is written (see `plus`). Where
    `applies` is false, F.conv2d itself."""
    if not applies(x, weight):
        return plus(F.conv2d(x, weight, bias, stride, padding, dilation, groups), add)
    stride, padding, dilation = (list(nn.modules.utils._pair(v)) for v in (stride, padding, dilation))
    if x.dtype == torch.bfloat16 and tuple(weight.shape[2:]) == (1, 1) and stride == [1, 1] and padding == [0, 0] \
            and groups == 1:
        return _pixel_product(owner, x, weight, bias, add)
    parts = _parts(weight, stride, groups)
    xs = [part.contiguous(memory_format=torch.channels_last) for part in x.split(parts, dim=1)]
    packed = _kept(owner, "_packed_weight", weight, (tuple(x.shape), tuple(stride), tuple(padding), tuple(parts)),
                   lambda: _pack_parts(weight.detach(), parts, [list(part.shape) for part in xs], padding, stride,
                                       dilation, groups))
    conv = torch.ops.mkldnn._convolution_pointwise
    if add is not None and layout(add) == torch.channels_last:
        out = conv.binary(xs[0], add, packed[0], bias, padding, stride, dilation, groups, "add", None, None, [], None)
        add = None
    else:
        out = conv(xs[0], packed[0], bias, padding, stride, dilation, groups, "none", [], "")
    for part, w in zip(xs[1:], packed[1:]):  # each further part added to the sum so far as it is written
        out = conv.binary(part, out, w, None, padding, stride, dilation, groups, "add", None, None, [], None)
    # an NCHW residual is added the plain way, so that the sum stays NCHW as it is (the fp32 VAE's attention, whose
    # output comes channels-last: its next convolutions stay NCHW, as exact as they were)
    return plus(out, add)


def _pixel_product(owner: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   add: torch.Tensor | None) -> torch.Tensor:
    """A bf16 1x1 convolution as oneDNN's inner product over x's pixels, each a row of its channels (x channels-last
    is that matrix already), on the weight packed as a linear layer's (linear_weight). On a 2-core Xeon with AMX,
    SD 1.5's 1x1 convolutions with their residuals (proj_in and proj_out, the ResBlocks' skips) took 0.70-0.85x the
    time as convolutions (320 channels at 64x64, batch 2: 0.85 against 1.22 ms), the same within a rounding; in
    fp32, where linear weights stay unpacked, 0.93-1.09x, so fp32 stays a convolution."""
    n, c, h, w = x.shape
    rows = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, c)
    added = add is not None and layout(add) == torch.channels_last  # as the product writes; NCHW ones after it
    out = inner_product(owner, rows, weight.flatten(1), bias, add.permute(0, 2, 3, 1).reshape(len(rows), -1)
                        if added else None, "_packed_rows", part_of=weight)
    return plus(out.view(n, h, w, -1).permute(0, 3, 1, 2), None if added else add)


def inner_product(owner: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  add: torch.Tensor | None = None, slot: str = "_packed_weight",
                  part_of: torch.Tensor | None = None) -> torch.Tensor:
    """x weight^T + bias, plus `add` (of the output's shape) as each output is written, by oneDNN's inner product on
    the weight packed once (linear_weight, on `owner` under `slot`): layers.Linear's and _pixel_product's."""
    # contiguous: on strided rows oneDNN takes a path hundreds of times slower
    x, w = x.contiguous(), linear_weight(owner, weight, x, slot, part_of)
    if add is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, add.contiguous(), w, bias, "add")
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def _pack_parts(weight: torch.Tensor, parts: list[int], shapes: list[list[int]], padding, stride, dilation,
                groups: int) -> list[torch.Tensor]:
    """The packed weights of a convolution's parts of input channels (conv2d), for inputs of these shapes. Each part
    is copied into one buffer per width and packed from there: packed from the strided slices themselves (or a fresh
    copy of each), a guided fp32 512x512 step held 0.8-1.2 GiB more than whole weights did, in the holes the copies
    left between the parts; this way, 0.2 GiB."""
    def pack(w, shape):
        return torch.ops.mkldnn._reorder_convolution_weight(w, padding, stride, dilation, groups, shape)

    if len(parts) == 1:
        return [pack(weight, shapes[0])]
    buffers, packed = {}, []
    for w, shape in zip(weight.split(parts, dim=1), shapes):
        if w.shape[1] not in buffers:
            buffers[w.shape[1]] = torch.empty_like(w, memory_format=layout(weight))
        packed.append(pack(buffers[w.shape[1]].copy_(w), shape))
    return packed


def _parts(weight: torch.Tensor, stride: list[int], groups: int) -> list[int]:
    """The input channels of each part the convolution goes in (see PART): all of them in one, except for wide
    stride-1 3x3 convolutions."""
    c = weight.shape[1]
    if c <= PART or groups != 1 or tuple(weight.shape[2:]) != (3, 3) or stride != [1, 1]:
        return [c]
    return [PART] * (c // PART) + [c % PART] * (c % PART > 0)


def plus(out: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
    """add + out, or out where there is nothing to add: a residual added the plain way, where oneDNN does not add it
    as each output is written. Where it does (conv2d, layers.Linear) the residual costs no pass over the activations
    of its own, and in bf16 the sum is rounded once, not twice: with the UNet's residuals added so, a guided SD 1.5
    512x512 bf16 step on a 2-core Xeon with AMX took 1.34 against 1.39 s (fp32: the same within the noise)."""
    return out if add is None else add + out


def linear_weight(owner: nn.Module, weight: torch.Tensor, x: torch.Tensor, slot: str = "_packed_weight",
                  part_of: torch.Tensor | None = None):
    """The weight of a oneDNN inner product of x (layers.Linear, geglu) packed once in bf16, kept on `owner` under
    `slot` (as the convolutions' are); fp32 weights as they are (there packing gained 1-10% for twice the weights'
    memory). In bf16, SD 1.5's products took 3-10% less time (a 4096-token 320 to 320 product 1.84 against
    2.06 ms), bit for bit the same. part_of: the parameter that weight is a view of (geglu's halves), which is what
    stays the same tensor from call to call."""
    if weight.dtype != torch.bfloat16:
        return weight
    rows = x.numel() // x.shape[-1]
    return _kept(owner, slot, weight if part_of is None else part_of, (rows,),
                 lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows))


def _kept(owner: nn.Module, slot: str, weight: torch.Tensor, shape: tuple, pack):
    """pack(), kept on owner (outside its parameters and state dict) while the weight is the same tensor unchanged
    (a LoRA merged in place changes its version; a move, the tensor) and the problem's shape the same."""
    key = (weight._version, *shape)
    kept = owner.__dict__.get(slot)  # (a weak reference to the weight, key, packed)
    if kept is None or kept[0]() is not weight or kept[1] != key:
        owner.__dict__[slot] = kept = (weakref.ref(weight), key, pack())
    return kept[2]


class Conv2d(nn.Conv2d):
    """nn.Conv2d (the same weights and state dict) that in CPU inference runs on its weight packed once (see
    `applies`); conv(x, add=r) is r + conv(x), for residuals (see conv2d). A hooked conv (a LoRA in training) runs
    nn.Conv2d's forward, so the hooks see it."""

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        if self._forward_hooks or self.padding_mode != "zeros":
            return plus(super().forward(x), add)
        return conv2d(self, x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups, add)
