"""Unit maps without crop forwards: an explicit backward through a verified module chain, on receptive-field
regions.

The crop path of :mod:`._engine` forwards every (image, unit) row on its own crop, then back-propagates it
with autograd. When the network up to the target layer is a plain **chain** of modules this module knows —
``Conv2d``, eval-mode ``BatchNorm2d``, ``ReLU`` (any backward rule of :mod:`._relu`), non-overlapping
``MaxPool2d``, ``Identity`` and eval-mode dropout — no crop forward is needed: one forward of the ``N`` whole
images (:func:`record_chain`) records every ReLU's output ``y`` (its mask ``I[x>0] = I[y>0]``) and every
max-pool's argmax, and each row's backward is then computed by hand (:func:`plan_backward`):

* ReLU: ``relu_backward_rule(y, g, rule)`` — guided backprop ``I[y>0]·I[g>0]·g`` (Springenberg et al. 2015),
  deconvnet ``I[g>0]·g``, plain ``I[y>0]·g``;
* batch norm (eval): ``g·γ/√(σ²+ε)`` per channel;
* max-pool: ``g`` moved to each window's recorded argmax (no overlaps, so no sums);
* convolution: the transposed convolution (``∂conv/∂input``), seeded with ``1`` at the row's unit and argmax.

Each run of ReLU / batch-norm / pool steps between two convolutions is one multiply by a precomputed map
(the product of its masks and scale, read at the argmax when a pool comes first) and one scatter: the clamp
``I[g>0]`` commutes with 0/1 masks and with the scatter, so these are the products autograd's rules form
(:func:`plan_chain`). Every level is computed on the row's **region** — the positions that reach the unit,
the same shape for every row (one position at the layer, then each transposed convolution's full output and
each pool's windows), placed at ``(i, j)·ratio + offset``; parts of a region that overhang the image meet a
zero in the padded maps and are dropped at the input. The result is the gradient autograd computes on the
whole image with the same masks and switches (the ones captum's hooks use), without the ``N·U`` crop forwards.
Chains :func:`plan_chain` cannot fold (a clamp below a scale, e.g. conv → ReLU → BN) run step by step on
stride-aligned crop windows (:func:`chain_backward`).

The chain is verified, not assumed: hooks on every leaf module record the calls of one forward, and the path
applies only when each call's input *is* the previous call's output (same tensor object, unchanged version
counter, so no functional op or in-place edit happened between modules), the first input is the network's
untouched input, the last output is the target layer's output, the recorded ReLU outputs are not edited
later, and every module is one of the kinds above with settings whose windows stay aligned (integer strides,
output = input / stride, zero padding, max-pool kernel = stride). Anything else (functional ReLUs, residual
additions, other activations, train mode) gives ``None`` and the caller keeps the autograd crop path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._relu import _RuleReLU, relu_backward_rule

__all__ = ["Step", "ChainPlan", "record_chain", "plan_chain", "plan_backward", "chain_backward"]


class _StopChain(Exception):
    """Raised once the target layer's output is recorded (nothing above it runs)."""


@dataclass
class Step:
    """One module of the chain, with what its backward needs.

    ``kind``: ``"relu"`` (``state`` = the output ``(N, C, H, W)``, ``rule`` its backward rule), ``"scale"``
    (``state`` = ``(C,)`` per-channel factor), ``"conv"`` (``module``), ``"pool"`` (``state`` = ``(N, C, Ho, Wo)``
    flat index of each window's maximum in its ``H·W`` input plane, as ``max_pool2d``'s) or ``"identity"``.
    ``stride_in``/``stride_out``: input pixels per position of the step's input and output.
    """

    kind: str
    module: nn.Module
    stride_in: tuple[int, int]
    stride_out: tuple[int, int]
    state: torch.Tensor | None = None
    rule: str = "plain"
    values: torch.Tensor | None = None  # a pool's output (its input at each argmax)


_DROPOUT = (nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _step(module: nn.Module, inp: torch.Tensor, out: torch.Tensor, stride_in: tuple[int, int]) -> Step | None:
    """The backward step of one recorded call, or None when the module is not one this path honours."""
    if inp.ndim != 4 or out.ndim != 4 or inp.shape[0] != out.shape[0]:
        return None
    (h, w), (ho, wo) = inp.shape[2:], out.shape[2:]
    if ho == 0 or wo == 0 or h % ho or w % wo:
        return None
    stride_out = (stride_in[0] * (h // ho), stride_in[1] * (w // wo))
    kind = type(module)
    if kind in (nn.ReLU, _RuleReLU):
        rule = module.effective_rule if kind is _RuleReLU else "plain"
        return Step("relu", module, stride_in, stride_out, out.detach(), rule)  # checked unchanged at the end
    if kind is nn.BatchNorm2d:
        if module.training or module.running_var is None or module.running_mean is None:
            return None
        scale = torch.rsqrt(module.running_var.detach() + module.eps)
        if module.weight is not None:
            scale = module.weight.detach() * scale
        return Step("scale", module, stride_in, stride_out, scale)
    if kind is nn.Conv2d:
        if module.padding_mode != "zeros" or isinstance(module.padding, str) and module.padding != "valid":
            return None
        if (h, w) != (ho * module.stride[0], wo * module.stride[1]):
            return None  # output = input / stride keeps every crop window aligned
        return Step("conv", module, stride_in, stride_out)
    if kind is nn.MaxPool2d:
        k, s = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
        if k != s or _pair(module.padding) != (0, 0) or _pair(module.dilation) != (1, 1) or (h, w) != (ho * s[0], wo * s[1]):
            return None
        index = torch.nn.functional.max_pool2d(inp.detach(), k, s, return_indices=True)[1]  # same kernel
        return Step("pool", module, stride_in, stride_out, index, values=out.detach())  # flat argmax per plane
    if kind is nn.Identity or isinstance(module, _DROPOUT) and not module.training:
        return Step("identity", module, stride_in, stride_out) if (h, w) == (ho, wo) else None
    return None


def record_chain(model: nn.Module, x: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor | None, list[Step] | None]:
    """One forward of ``x`` up to ``layer`` (no gradients): ``(layer output, chain steps or None)``.

    Returns ``(None, None)`` when the layer never ran, ``(output, None)`` when the network up to it is not a
    verified chain of supported modules (see the module docstring).
    """
    calls: list[list[Any]] = []
    store: dict[str, torch.Tensor] = {}
    handles = []
    leaves = [m for m in model.modules() if next(m.children(), None) is None]

    def pre(module: nn.Module, args: tuple) -> None:
        inp = args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else None
        calls.append([module, inp, None if inp is None else inp._version, None, None, None])

    def post(module: nn.Module, _args: tuple, out: Any) -> None:
        call = calls[-1] if calls and calls[-1][0] is module and calls[-1][3] is None else None
        if call is None or not isinstance(out, torch.Tensor) or call[1] is None:
            calls.append([None, None, None, None, None, None])  # a nested or odd call: breaks the chain
            return
        stride_in = (1, 1) if len(calls) == 1 else (calls[-2][5].stride_out if calls[-2][5] is not None else None)
        call[3], call[4] = out, out._version
        call[5] = None if stride_in is None else _step(module, call[1], out, stride_in)

    def stop(_m: nn.Module, _i: tuple, out: Any) -> None:
        store["out"] = out
        raise _StopChain

    try:
        for m in leaves:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        handles.append(layer.register_forward_hook(stop))
        start = x._version
        with torch.no_grad():
            try:
                model(x)
            except _StopChain:
                pass
    finally:
        for h in handles:
            h.remove()
    out = store.get("out")
    if not isinstance(out, torch.Tensor):
        return None, None
    ok = bool(calls) and calls[0][1] is x and calls[0][2] == start and calls[-1][3] is out
    for prev, call in zip([None] + calls[:-1], calls):
        if not ok:
            break
        ok = call[5] is not None and call[3] is not None and (
            prev is None or (call[1] is prev[3] and call[2] == prev[4]))
    ok = ok and out.ndim == 4 and all(c[3]._version == c[4] for c in calls if c[5].kind == "relu")  # kept states unedited
    return out, [c[5] for c in calls] if ok else None


def _windows(t: torch.Tensor, size: tuple[int, int], step: tuple[int, int], img: torch.Tensor, cy: torch.Tensor,
             cx: torch.Tensor) -> torch.Tensor:
    """``t[img[r], :, cy[r]·step : +size, cx[r]·step : +size]`` for every row r, in one index op."""
    return t.unfold(2, size[0], step[0]).unfold(3, size[1], step[1])[img, :, cy, cx]


@dataclass
class _Segment:
    """The steps above one convolution (or above the input), run on each row's *region*: the positions of the
    level that reach the row's unit (its receptive field there), the same size and offset for every row.

    Geometry of the level where ``factor`` applies: a row whose unit sits at target position ``(i, j)`` covers
    padded-map positions ``(i + shift)·ratio … + size`` (``ratio`` = target stride / this level's stride),
    i.e. the windows ``shift`` onwards of ``map.unfold(ratio)``. ``factor``: the run's ReLU masks (0/1),
    batch-norm scale and the inside-the-image indicator, as one whole-image map zero-padded around the image;
    with a pool first (in reverse order) it is read at each window's argmax, at the pool's output resolution,
    and ``index`` holds each window's argmax as ``iy·w + ix`` (padded coordinates of the pool input, ``w`` the
    region's width there; padding windows point at their own corner, so no two windows share a target).
    """

    clamp: bool
    factor: torch.Tensor | None
    index: torch.Tensor | None
    pool: tuple[int, int]
    ratio: tuple[int, int]
    shift: tuple[int, int]
    size: tuple[int, int]
    conv: nn.Module | None
    masks: tuple[torch.Tensor, ...] = ()  # the top only: ReLU outputs read at each row's position


@dataclass
class ChainPlan:
    """:func:`plan_chain`'s result: the segments, top first, and the input-level region (``ratio``, ``offset``
    from ``(i, j)·ratio``, ``size``)."""

    segments: list[_Segment]
    ratio: tuple[int, int]
    offset: tuple[int, int]
    size: tuple[int, int]


def _pad_for(dim: int, positions: int, ratio: int, off: int, size: int) -> tuple[int, int, int]:
    """Zero padding ``(lo, hi)`` of a level's map so every row's region lies inside it, and the region's
    first window index minus the target position (``(off + lo) / ratio``, ``lo`` rounded up to make it whole)."""
    lo = max(0, -off)
    lo += (-(off + lo)) % ratio
    hi = max(0, (positions - 1) * ratio + off + size - dim)
    return lo, hi, (off + lo) // ratio


def plan_chain(steps: list[Step], target: tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> ChainPlan | None:
    """Fold each run of ReLU / batch-norm / max-pool steps between convolutions into one multiply (+ scatter)
    and lay out the per-level regions; None for a chain this does not cover (the caller runs step by step).

    In reverse order a run is ``[pool] relu/scale/identity …``; its backward ``(unpool(g)·I[y>0])·s`` (guided:
    times the ReLU's ``I[g>0]``) equals ``unpool(clamp(g) · (I[y>0]·s)[argmax])``: masks are 0/1 and the
    unpooling only moves values, so the clamp moves to the front and every product is the same float product.
    Not covered: a pool below another step of its run, two clamping ReLUs or a clamp below a scale in one run,
    two scales, a conv with ``groups > 1``. ``target``: the target layer's output shape ``(N, K, h, w)``.
    """
    n, _, th, tw = target
    top = steps[-1].stride_out
    ratio, off, size = (1, 1), (0, 0), (1, 1)
    segments: list[_Segment] = []
    run: list[Step] = []
    # the ReLU output each pool reads, when the ReLU directly feeds it
    pool_inputs = {id(b): a.state for a, b in zip(steps, steps[1:]) if a.kind == "relu" and b.kind == "pool"}
    for st in list(reversed(steps)) + [None]:
        if st is not None and st.kind != "conv":
            run.append(st)
            continue
        if st is not None and st.module.groups != 1:
            return None
        clamp, mask, scale, states = False, None, None, []
        pool = run[0] if run and run[0].kind == "pool" else None
        pool_input = pool_inputs.get(id(pool))
        for r in run[1 if pool is not None else 0:]:
            if r.kind == "pool":
                return None
            if r.kind == "relu":
                if r.rule in ("guided", "deconvnet"):
                    if clamp or scale is not None:
                        return None
                    clamp = True
                if r.rule in ("plain", "guided"):
                    states.append(r.state)
                    if pool is None and not segments:
                        continue  # the top: read per row at the unit's position (plan_backward)
                    if pool is None:
                        y = r.state
                    elif r.state is pool_input:  # the pool's output is its input at the argmax
                        y = pool.values
                    else:
                        y = r.state.flatten(2).gather(2, pool.state.flatten(2)).view(pool.state.shape)
                    mask = y > 0 if mask is None else mask & (y > 0)
            elif r.kind == "scale":
                if scale is not None:
                    return None
                scale = r.state.to(dtype)
        if st is None and not run:
            break  # nothing below the lowest convolution: the caller drops the region's overhang
        if not segments and pool is None:  # the top: one position per row, no whole-image map
            segments.append(_Segment(clamp, scale, None, (1, 1), ratio, (0, 0), size,
                                     None if st is None else st.module, tuple(states)))
            if st is not None:
                ratio, off, size = _through_conv(st.module, ratio, off, size)
            run = []
            continue
        level = run[0].stride_out if run else st.stride_out  # where the multiply happens (a pool's output)
        dims = (th * top[0] // level[0], tw * top[1] // level[1])
        if mask is None:
            factor = torch.ones(1, 1, *dims, dtype=dtype, device=device)
            if scale is not None:
                factor = factor * scale[:, None, None]
        else:  # one pass: bool × float
            factor = mask.view(n, -1, *dims) * (scale[:, None, None] if scale is not None else
                                                torch.ones((), dtype=dtype, device=device))
        factor = factor.expand(n, *factor.shape[1:])
        index, k = None, (1, 1)
        if pool is not None:
            k = (pool.stride_out[0] // pool.stride_in[0], pool.stride_out[1] // pool.stride_in[1])
        pads = [_pad_for(dims[a], (th, tw)[a], ratio[a], off[a], size[a]) for a in (0, 1)]
        factor = torch.nn.functional.pad(factor, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
        if pool is not None:
            width = pool.state.shape[3] * k[1]  # the pool input's width; index = iy·width + ix there
            region_w = size[1] * k[1]
            ho, wo = pool.state.shape[2:]
            hp, wp = ho + pads[0][0] + pads[0][1], wo + pads[1][0] + pads[1][1]
            # padding windows point at their own corner (iy, ix) = (I·k, J·k) of the padded grid ...
            corner = (torch.arange(hp, device=factor.device)[:, None] * (k[0] * region_w)
                      + torch.arange(wp, device=factor.device) * k[1])
            index = corner.expand(n, pool.state.shape[1], hp, wp).clone()
            # ... real ones at their argmax, (iy + lo·k)·region_w + ix + lo·k = index − iy·(width − region_w) + c
            iy = torch.div(pool.state, width, rounding_mode="floor")
            real = pool.state.add(iy, alpha=region_w - width).add_(pads[0][0] * k[0] * region_w + pads[1][0] * k[1])
            index[:, :, pads[0][0]:pads[0][0] + ho, pads[1][0]:pads[1][0] + wo] = real
        segments.append(_Segment(clamp, factor, index, k, ratio, (pads[0][2], pads[1][2]), size,
                                 None if st is None else st.module))
        if pool is not None:
            ratio, off, size = (ratio[0] * k[0], ratio[1] * k[1]), (off[0] * k[0], off[1] * k[1]), (size[0] * k[0], size[1] * k[1])
        if st is not None:
            ratio, off, size = _through_conv(st.module, ratio, off, size)
        run = []
    return ChainPlan(segments, ratio, off, size)


def _through_conv(m: nn.Module, ratio: tuple[int, int], off: tuple[int, int],
                  size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """A region's geometry one convolution down: the full transposed convolution's output."""
    (sy, sx), (py, px), (dy, dx) = m.stride, _padding(m), m.dilation
    kh, kw = m.weight.shape[2:]
    return ((ratio[0] * sy, ratio[1] * sx), (off[0] * sy - py, off[1] * sx - px),
            ((size[0] - 1) * sy + dy * (kh - 1) + 1, (size[1] - 1) * sx + dx * (kw - 1) + 1))


def plan_backward(plan: ChainPlan, img: torch.Tensor, unit: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
                  channels: int, dtype: torch.dtype) -> torch.Tensor:
    """Input gradients of ``A[img[r], unit[r], i[r], j[r]]`` on each row's input region ``(rows, C, *plan.size)``
    (which starts at input pixel ``(i, j)·plan.ratio + plan.offset`` and may overhang the image: the caller
    drops the overhang). ``channels``: the target layer's."""
    rows = int(img.numel())
    g = None
    for seg in plan.segments:
        if g is None and seg.index is None:  # the top: one value per row, at (unit, i, j)
            # the seed 1 (its clamp is 1) times the ReLU masks and the scale there: the same products
            v = torch.ones(rows, dtype=dtype, device=img.device)
            for y in seg.masks:
                v = v * (y[img, unit, i, j] > 0)
            if seg.factor is not None:
                v = v * seg.factor[unit]
            if seg.conv is None:
                g = v.reshape(rows, 1, 1, 1) * (torch.arange(channels, device=v.device) == unit[:, None]).to(
                    dtype)[:, :, None, None]
            else:
                g = _onehot_transposed(seg.conv, v, unit)
            continue
        if g is None:
            g = torch.zeros(rows, channels, 1, 1, dtype=dtype, device=img.device)
            g[torch.arange(rows, device=img.device), unit] = 1.0
        if seg.clamp:
            g = g.clamp(min=0)
        h_, w_ = seg.size
        wy, wx = i + seg.shift[0], j + seg.shift[1]
        g = g * _windows(seg.factor, seg.size, seg.ratio, img, wy, wx)
        if seg.index is not None:
            ky, kx = seg.pool
            corner = ((wy * seg.ratio[0] * ky) * (w_ * kx) + wx * seg.ratio[1] * kx)[:, None, None, None]
            local = (_windows(seg.index, seg.size, seg.ratio, img, wy, wx) - corner).flatten(2)
            g = torch.zeros(rows, g.shape[1], h_ * ky * w_ * kx, dtype=g.dtype, device=g.device).scatter_(
                2, local, g.flatten(2)).view(rows, g.shape[1], h_ * ky, w_ * kx)
        if seg.conv is not None:
            m = seg.conv
            g = torch.nn.functional.conv_transpose2d(g, m.weight.detach().to(g.dtype), None, m.stride, 0, 0,
                                                     1, m.dilation)
    return g


def _onehot_transposed(m: nn.Module, v: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """The transposed convolution of a map that is ``v[r]`` at one position of channel ``unit[r]``: row r's
    filter ``W[unit[r]]`` times ``v[r]`` (spread by the dilation) — the same products, without the dense pass."""
    w = m.weight.detach().to(v.dtype)
    dy, dx = m.dilation
    patch = v[:, None, None, None] * w[unit]
    if (dy, dx) == (1, 1):
        return patch
    kh, kw = w.shape[2:]
    out = patch.new_zeros(patch.shape[0], patch.shape[1], dy * (kh - 1) + 1, dx * (kw - 1) + 1)
    out[:, :, ::dy, ::dx] = patch
    return out


def chain_backward(steps: list[Step], crop: tuple[int, int], grid: tuple[int, int], img: torch.Tensor,
                   cy: torch.Tensor, cx: torch.Tensor, unit: torch.Tensor, pi: torch.Tensor,
                   pj: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    """Step by step (chains :func:`plan_chain` does not cover): input gradients ``(rows, C, crop_h, crop_w)``
    of ``A[img[r], unit[r], pi[r], pj[r]]`` on crop windows.

    Row ``r``'s window starts at input pixel ``(cy[r]·grid_y, cx[r]·grid_x)`` (``grid`` = the target layer's
    stride, a multiple of every step's); ``pi``/``pj`` are the target position inside the window.
    """
    rows = int(img.numel())
    top = steps[-1].stride_out
    g = torch.zeros(rows, channels, crop[0] // top[0], crop[1] // top[1], dtype=dtype, device=img.device)
    g[torch.arange(rows, device=img.device), unit, pi, pj] = 1.0
    for st in reversed(steps):
        sy, sx = st.stride_in
        size_in = (crop[0] // sy, crop[1] // sx)
        if st.kind == "relu":
            so = st.stride_out
            y = _windows(st.state, (crop[0] // so[0], crop[1] // so[1]), (grid[0] // so[0], grid[1] // so[1]),
                         img, cy, cx)
            g = relu_backward_rule(y, g, st.rule)
        elif st.kind == "scale":
            g = g * st.state.to(g.dtype)[:, None, None]
        elif st.kind == "conv":
            m = st.module
            g = torch.nn.grad.conv2d_input((rows, m.in_channels, *size_in), m.weight.detach().to(g.dtype), g,
                                           m.stride, _padding(m), m.dilation, m.groups)
        elif st.kind == "pool":
            r_, c_, h_, w_ = g.shape
            width = st.state.shape[3] * (st.stride_out[1] // sx)
            index = _windows(st.state, (h_, w_), (grid[0] // st.stride_out[0], grid[1] // st.stride_out[1]),
                             img, cy, cx)
            local = ((index // width - (cy * (grid[0] // sy))[:, None, None, None]) * size_in[1]
                     + index % width - (cx * (grid[1] // sx))[:, None, None, None])
            g = torch.zeros(r_, c_, size_in[0] * size_in[1], dtype=g.dtype, device=g.device).scatter_(
                2, local.flatten(2), g.flatten(2)).view(r_, c_, *size_in)
    return g


def _padding(m: nn.Module) -> tuple[int, int]:
    return (0, 0) if m.padding == "valid" else _pair(m.padding)
