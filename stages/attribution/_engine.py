"""Targets and the one backward engine every gradient-family method shares.

A *target* says which scalar per example is explained:

* a class: an ``int`` (the same class for every example) or a ``(N,)`` integer tensor (one class per
  example) — the model's **logit** (Simonyan et al. 2013 and Grad-CAM use logits, not probabilities);
* a unit: :class:`UnitTarget` (``layer``, ``units``, ``reduce``) — channel ``k`` of a named layer, reduced
  over space by ``"mean"`` or ``"max"``. ``units=None`` means every unit of the layer.

Unit targets for many units are computed **batched, not one call per unit** (the replication trick):
each input is repeated ``m`` times (one copy per unit of a chunk of ``m`` units, batch ``N·m``), the forward
pass stops at the target layer (a hook raises once the layer's output is captured, so nothing above the
layer is computed), the objective ``Σ_{b,k} φ(A[copy(b,k), k])`` is built and **one** backward pass gives
every copy its own unit's gradient, because copies never interact in an ``eval()`` network (no batch
statistics, no dropout). Cost: one truncated forward + one backward on ``N·m`` images per chunk, i.e. the
same arithmetic as ``m`` separate calls but in one autograd graph with large kernels, no per-call hook
registration, no forward beyond the layer, and memory ``m×`` that of one call (bounded by ``unit_chunk``).

**Receptive-field crops** (the fast path for ``reduce="max"`` gradients at the input): the max of unit ``k``
sits at one position ``(i, j)``, and its gradient reaches only the input pixels in that position's receptive
field. So each (image, unit) pair is computed on a crop of the input around ``(i, j)`` — the receptive field
rounded out to the layer's stride grid on each side (``(⌈up/s⌉ + ⌈down/s⌉)·s`` pixels), so every pooling grid
is the same as in the full image — which gives exactly the full image's gradient inside the crop and zero
outside: every activation on a path to the unit depends only on pixels inside the receptive field, and the
crop's own zero padding only touches positions off those paths. The receptive field is measured once per
(network, layer, input size) as the union support of the unit gradient with every ReLU passing gradient
through, over random inputs, and cropping is skipped when the crop would not be smaller than the image, when
the layer's stride is not an integer, or for rows whose maximum is tied. Crops are gathered from one strided
``unfold`` view (one index op, no per-row copies) and, for float32 on the CPU, laid out channels-last, where
CPU max-pooling is ≈ 20× faster than on NCHW (values equal to the NCHW computation up to float32 rounding,
≤ 3e-7 relative measured). Cost per (image, unit): one forward to the layer and one backward on a crop of
``RF`` rounded to the stride instead of the whole image — at the demo's conv3 (receptive field 18 px, stride
4) a 20-px crop of a 64-px image, 10× fewer pixels, on top of not running the layers above.

**Module chains: one shared forward, no crop forwards** (:mod:`._chain`). When the network up to the layer
is a verified chain of ``Conv2d`` / eval ``BatchNorm2d`` / ``ReLU`` / non-overlapping ``MaxPool2d`` modules
(the demo CNN, VGG-style nets), the ``N`` whole images are forwarded once (the same pass that finds the
argmaxes) recording every ReLU's output and every pool's argmax; each (image, unit) row is then
back-propagated by hand on its receptive-field *region* at every level — exactly the positions that reach the
unit, the same shape for every row (at the demo's conv3: 1 → 3×3 → 6×6 → 8×8 → 16×16 → 18×18 positions) —
with the recorded masks and pool switches: per run of ReLU / batch-norm / pool steps one multiply by a
precomputed map (``I[y>0]·γ/σ``, read at the argmax for a pool) and one scatter, then a full transposed
convolution. Guided backprop is not linear in the seed (``I[g>0]``), so every row still has its own backward,
but the clamp commutes with the 0/1 masks and the scatter, so these are the same float products as the
autograd rules; the values are the whole-image masks (the ones captum uses), so the maps equal captum's
(max |diff| 0 in the benchmark). Cost per row: the transposed convolutions of its regions — no forward, and
the regions are smaller than the stride-aligned crop (8×8 and 16×16 instead of 10×10 and 20×20 at conv2 and
conv1's outputs); the whole-image states cost one forward of the ``N`` images plus a few passes over them.
Chains with anything else (functional ReLUs, residual additions, in-place edits between modules) keep the
autograd crop path above, and so do calls whose whole images hold more pixels than all the rows' crops
(``N·H·W > rows·crop``: at 224 px with 1,024 rows the crops measured cheaper than the whole-image states). Rows whose maximum is a tied 0 under the layer's own ReLU are exactly 0 and are
not computed.

Why not a batched (vmapped) backward over the units' seeds? Guided backprop and deconvnet are *not* linear in
the seed (their ReLU rule keeps only ``g > 0``), so seeds cannot be summed; a vmapped backward over U one-hot
seeds runs U dense backward passes over the whole image (4096 px at 64 px) where a region holds 324 px at the
input and fewer above. Measured against captum's neuron loop (``benchmarks/bench_attribution.py``, 1 thread,
16 images): see ``benchmarks/README.md``.

The engine returns the gradient (or, for LRP, the relevance) of the objective at the input or at an
intermediate layer, plus that layer's activation — which is what Grad-CAM needs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .._errors import StageInputError
from ._chain import ChainPlan, chain_backward, plan_backward, plan_chain, record_chain

__all__ = ["UnitTarget", "RowUnitTarget", "Target", "MapFn", "module_by_name", "class_indices", "backward_maps",
           "target_scores"]

#: a reduction applied to each piece of maps as it is made: ``(rows, *shape) → (rows, *reduced)``, row by row
#: (each output row a function of its own map only), e.g. ``max_c |g|``
MapFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class UnitTarget:
    """Explain unit(s) of ``layer``: channel ``k``'s spatial ``reduce`` (``"mean"`` or ``"max"``).

    ``units=None`` explains every unit of the layer; maps then have a unit axis after the batch axis.
    """

    layer: str
    units: Sequence[int] | None = None
    reduce: str = "max"

    def __post_init__(self) -> None:
        if self.reduce not in ("mean", "max"):
            raise StageInputError(f"UnitTarget.reduce must be 'mean' or 'max'; got {self.reduce!r}")


@dataclass(frozen=True)
class RowUnitTarget:
    """One unit per input row: row ``i`` explains unit ``units[i]`` of ``layer`` (e.g. each unit's own exemplars
    stacked into one batch). Maps have no unit axis: ``(N, ...)`` like a class target."""

    layer: str
    units: Sequence[int]
    reduce: str = "max"

    def __post_init__(self) -> None:
        if self.reduce not in ("mean", "max"):
            raise StageInputError(f"RowUnitTarget.reduce must be 'mean' or 'max'; got {self.reduce!r}")


Target = int | Sequence[int] | torch.Tensor | UnitTarget | RowUnitTarget


class _Stop(Exception):
    """Raised by a capture hook to end the forward pass once every needed layer has run."""


def module_by_name(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called ``name`` (``dict(model.named_modules())[name]``), or one clear error."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        shown = ", ".join(n for n in modules if n)[:400]
        raise StageInputError(f"layer {name!r} is not a module of {type(model).__name__}; modules: {shown}")
    return modules[name]


def class_indices(target: int | Sequence[int] | torch.Tensor, n: int, num_outputs: int) -> torch.Tensor:
    """``(n,)`` int64 class index per example, checked against the model's ``num_outputs``."""
    t = torch.as_tensor(target, dtype=torch.int64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise StageInputError(f"target has {t.numel()} class indices for {n} inputs; give one int or one per input")
    if n and (int(t.min()) < 0 or int(t.max()) >= num_outputs):
        raise StageInputError(f"target class {t.tolist()} out of range for a model with {num_outputs} outputs")
    return t


@contextlib.contextmanager
def _capture(model: nn.Module, names: Sequence[str], stop_after: str | None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of ``names`` during forward; raise :class:`_Stop` right after ``stop_after`` runs."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name in dict.fromkeys(names):
        module = module_by_name(model, name)

        def hook(_m: nn.Module, _i: object, output: torch.Tensor, name: str = name) -> None:
            if not isinstance(output, torch.Tensor):
                raise StageInputError(f"layer {name!r} does not output one tensor; pick a conv block or linear layer")
            store[name] = output
            if stop_after is not None and all(n in store for n in names):
                raise _Stop

        handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _forward(model: nn.Module, x: torch.Tensor, names: Sequence[str], stop: bool) -> tuple[torch.Tensor | None, dict]:
    with _capture(model, names, "stop" if stop else None) as store:
        try:
            out = model(x)
        except _Stop:
            out = None
    return out, dict(store)


def _reduce(a: torch.Tensor, how: str) -> torch.Tensor:
    """``(B, h, w)`` or ``(B,)`` → ``(B,)``: spatial mean or max (``amax``: ties share the gradient, as captum)."""
    if a.ndim == 1:
        return a
    return a.flatten(1).mean(1) if how == "mean" else a.flatten(1).amax(1)


def _units(target: UnitTarget, channels: int) -> list[int]:
    units = list(range(channels)) if target.units is None else [int(u) for u in target.units]
    bad = [u for u in units if not 0 <= u < channels]
    if bad:
        raise StageInputError(f"units {bad} out of range for layer {target.layer!r} with {channels} units")
    return units


def _layer_channels(model: nn.Module, x: torch.Tensor, layer: str) -> int:
    with torch.no_grad():
        _, store = _forward(model, x[:1], [layer], stop=True)
    return int(store[layer].shape[1])


def backward_maps(
    model: nn.Module,
    x: torch.Tensor,
    target: Target,
    *,
    wrt: str | None = None,
    relevance: bool = False,
    unit_chunk: int = 16,
    crop: bool = True,
    map_fn: MapFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the target at the input (``wrt=None``) or at layer ``wrt``'s output, and what it was taken at.

    Args:
        model: in ``eval()`` mode; any gradient rules (guided backprop, LRP) are already installed.
        x: ``(N, C, H, W)`` float input.
        target: class index(es) or a :class:`UnitTarget`.
        wrt: ``None`` for the input, else a layer name below the target.
        relevance: seed the backward with ``output ⊙ ∂φ/∂output`` (LRP: relevance = the explained value)
            instead of ``∂φ/∂output``.
        unit_chunk: units per replicated batch (memory: ``unit_chunk×`` one call's).
        crop: use receptive-field crops for ``reduce="max"`` input gradients (exact; see module docstring).
        map_fn: a row-wise reduction of the maps (see :data:`MapFn`), applied to each piece as it is made, so
            that the full ``(N, U, *shape)`` stack is never held: memory is that of the reduced maps plus one
            piece (a pass of rows or a unit chunk). Every forward and backward runs on the same batches as
            without it, so ``map_fn(maps)`` is the same bits either way (tested).

    Returns:
        ``(grad, at)``: for a class target ``(N, *shape)``; for a unit target ``(N, U, *shape)`` where shape is
        the input's or the layer's; ``at`` is the input or the layer's activation with the same layout. With
        ``map_fn`` the maps are reduced (``(N, *reduced)``, ``(N, U, *reduced)``) and ``at`` is the input
        (``wrt=None``, as an expanded view for a unit target) or, for ``wrt``, the layer's activation as
        without it (every chunk's, ``(N, U, *layer shape)``).
    """
    if x.ndim < 2:
        raise StageInputError(f"inputs must be batched (N, C, H, W); got shape {tuple(x.shape)}")
    x = x.detach()
    if isinstance(target, RowUnitTarget):
        cols = [int(u) for u in target.units]
        if len(cols) != x.shape[0]:
            raise StageInputError(f"RowUnitTarget has {len(cols)} units for {x.shape[0]} inputs; give one per input")
        _units(UnitTarget(target.layer, cols), _layer_channels(model, x, target.layer))
        if crop and target.reduce == "max" and wrt is None and not relevance:
            g = _unit_rows_cropped(model, x, list(range(x.shape[0])), cols, target.layer, map_fn=map_fn)
            if g is not None:
                return g, x
        g, at = _unit_rows(model, x, cols, target.layer, target.reduce, wrt, relevance)
        return (g, at) if map_fn is None else (map_fn(g), at)
    if isinstance(target, UnitTarget):
        units = _units(target, _layer_channels(model, x, target.layer))
        if crop and target.reduce == "max" and wrt is None and not relevance:
            n, u = x.shape[0], len(units)
            g = _unit_rows_cropped(model, x, [b for b in range(n) for _ in units], units * n, target.layer,
                                   map_fn=map_fn)
            if g is not None:
                return g.reshape(n, u, *g.shape[1:]), x.unsqueeze(1).expand(n, u, *x.shape[1:])
        grads, ats = [], []
        for start in range(0, len(units), max(1, int(unit_chunk))):
            chunk = units[start:start + max(1, int(unit_chunk))]
            m = len(chunk)
            g, at = _unit_rows(model, x.repeat_interleave(m, dim=0), chunk * x.shape[0], target.layer,
                               target.reduce, wrt, relevance)
            if map_fn is not None:  # keep only the reduced maps: the chunk's full maps go now
                g = map_fn(g)
            if wrt is not None or map_fn is None:  # (the input, replicated, is x: a view is returned below)
                ats.append(at.reshape(x.shape[0], m, *at.shape[1:]))
            grads.append(g.reshape(x.shape[0], m, *g.shape[1:]))
        if not ats:
            return torch.cat(grads, 1), x.unsqueeze(1).expand(x.shape[0], len(units), *x.shape[1:])
        return torch.cat(grads, 1), torch.cat(ats, 1)
    xr = x.clone().requires_grad_(True)
    out, store = _forward(model, xr, [wrt] if wrt else [], stop=False)
    if out is None or out.ndim != 2:
        raise StageInputError(f"a class target needs a model that outputs (N, classes) logits; got "
                              f"{None if out is None else tuple(out.shape)}")
    t = class_indices(target, x.shape[0], out.shape[1]).to(out.device)
    seed = torch.zeros_like(out)
    seed[torch.arange(out.shape[0], device=out.device), t] = 1.0
    if relevance:
        seed = seed * out.detach()
    wrt_t = store[wrt] if wrt else xr
    g = torch.autograd.grad(out, wrt_t, grad_outputs=seed)[0]
    return (g if map_fn is None else map_fn(g)), wrt_t.detach()


_RF_CACHE: dict[tuple, tuple[int, int, int, int, int, int] | None] = {}


def _receptive_field(model: nn.Module, x: torch.Tensor, layer: str) -> tuple[int, int, int, int, int, int] | None:
    """``(stride_y, stride_x, up, down, left, right)`` input extents of one position of ``layer``, or None.

    Measured on a copy of the network with random weights (so pruned or zero weights in the real one cannot
    hide part of the field) and 16 random inputs, with the ``linear`` ReLU rule (every path passes gradient),
    as the bounding box of the union support of the centre position's channel-summed gradient; None when the
    layer's stride is not an integer or the layer is not spatial.
    """
    import copy

    from ._relu import relu_rule

    n, c, h, w = x.shape
    key = (type(model).__name__, hash(repr(model)), layer, c, h, w, str(x.dtype), str(x.device))
    if key in _RF_CACHE:
        return _RF_CACHE[key]
    result = None
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(16, c, h, w, generator=gen, dtype=x.dtype).to(x.device).requires_grad_(True)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for param in twin.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype).to(param.device))
    with relu_rule(twin, "linear"):
        _, store = _forward(twin, probe, [layer], stop=True)
        a = store[layer]
        if a.ndim == 4 and h % a.shape[2] == 0 and w % a.shape[3] == 0:
            sy, sx = h // a.shape[2], w // a.shape[3]
            pi, pj = a.shape[2] // 2, a.shape[3] // 2
            g = torch.autograd.grad(a[:, :, pi, pj].sum(), probe)[0]
            support = g.detach().abs().sum((0, 1)) > 0
            rows, cols = torch.nonzero(support.any(1)).flatten(), torch.nonzero(support.any(0)).flatten()
            if rows.numel() and cols.numel():
                result = (sy, sx, pi * sy - int(rows.min()), int(rows.max()) + 1 - pi * sy,
                          pj * sx - int(cols.min()), int(cols.max()) + 1 - pj * sx)
    if len(_RF_CACHE) > 64:
        _RF_CACHE.clear()
    _RF_CACHE[key] = result
    return result


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last for float32 image batches on the CPU, where max-pooling is ≈ 20× faster than on NCHW
    (values equal to the NCHW computation up to float32 rounding); anything else unchanged."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _crop_plan(size: int, stride: int, lo: int, hi: int) -> int | None:
    """Crop length along one axis: the receptive field ``lo + hi`` rounded out to the stride grid on each side
    (``(⌈lo/s⌉ + ⌈hi/s⌉)·s``), or None when it would not be smaller than ``size``."""
    length = (-(-lo // stride) + -(-hi // stride)) * stride
    return None if length >= size else length


def _unit_rows_cropped(model: nn.Module, x: torch.Tensor, image_of_row: list[int], cols: list[int], layer: str,
                       rows_per_pass: int = 256, map_fn: MapFn | None = None) -> torch.Tensor | None:
    """Input gradients of ``max_ij A[image_of_row[r], cols[r]]`` for every row ``r``, on receptive-field crops.

    The layer is evaluated once on the ``N`` distinct images to find each row's argmax (recording, for a
    module chain, what :mod:`._chain` needs: then every row is back-propagated by hand on its region, no crop
    forward); otherwise rows are cut from ``x`` (never replicated whole) and run through autograd. Returns
    ``(rows, C, H, W)`` (with ``map_fn``: ``map_fn`` of it, made pass by pass), or None when cropping does not
    apply.
    """
    rf = _receptive_field(model, x, layer)
    if rf is None:
        return None
    sy, sx, up, down, left, right = rf
    n, c, h, w = x.shape
    ch, cw = _crop_plan(h, sy, up, down), _crop_plan(w, sx, left, right)
    if ch is None and cw is None:
        return None
    ch, cw = ch or h, cw or w
    if n * h * w <= len(cols) * ch * cw:  # the chain path's whole-image work is below the crops' work
        a, steps = record_chain(model, x, module_by_name(model, layer))
    else:  # large images, few rows: per-row crops are cheaper than whole-image states (measured at 224 px)
        a, steps = None, None
    if a is None:
        with torch.no_grad():
            _, store = _forward(model, x, [layer], stop=True)
        a = store[layer]
    img = torch.as_tensor(image_of_row, device=a.device)
    sel = a[img, torch.as_tensor(cols, device=a.device)].flatten(1)  # (rows, hw)
    peak = sel.max(1)
    tie = (sel == peak.values[:, None]).sum(1) > 1
    if steps is not None and steps[-1].kind == "relu" and steps[-1].rule in ("plain", "guided"):
        # a tied maximum of 0 under the layer's own ReLU: every tied position has y = 0, where the ReLU's
        # backward passes nothing — the map is exactly 0 (no pass needed)
        tie &= peak.values > 0
        zero = (peak.values <= 0).tolist()
    else:
        zero = [False] * len(cols)
    ties = tie.tolist()
    pos = peak.indices
    i, j = (pos // a.shape[3]).tolist(), (pos % a.shape[3]).tolist()
    total = len(cols)
    plan = None if steps is None else plan_chain(steps, tuple(a.shape), x.dtype, x.device)
    todo = [r for r in range(total) if not ties[r] and not zero[r]]
    sink = _Sink(total, (c, h, w), x.dtype, x.device, map_fn)
    if plan is not None:  # a verified module chain: explicit backward on each row's receptive-field region
        _plan_maps(plan, x, a, img, cols, pos, todo, rows_per_pass, sink)
    else:
        _crop_maps(model, x, layer, sink, img, cols, i, j, todo, steps, rf, (ch, cw), a.shape[1], rows_per_pass)
    tied = [r for r in range(total) if ties[r]]
    if tied:  # several maxima share the gradient (amax): the whole-image path for those rows
        g, _ = _unit_rows(model, _fast_layout(x[[image_of_row[r] for r in tied]]), [cols[r] for r in tied], layer,
                          "max", None, False)
        sink.put(torch.as_tensor(tied, device=x.device), g)
    return sink.out


class _Sink:
    """Where the cropped paths put their rows' maps: the ``(rows, C, H, W)`` stack itself, or — with a
    ``map_fn`` — the reduced maps, each pass's maps built in a zeroed buffer of the pass's rows and reduced
    at once (rows never computed are ``map_fn`` of a zero map)."""

    def __init__(self, total: int, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
                 map_fn: MapFn | None) -> None:
        self.shape, self.dtype, self.device, self.map_fn = shape, dtype, device, map_fn
        numel = total * shape[0] * shape[1] * shape[2]
        if map_fn is None:
            self.flat = _zeros(numel + 1, dtype, device)  # + a spare slot for the plan path's overhang
            self.out = self.flat[:-1].view(total, *shape)
        else:
            blank = map_fn(torch.zeros(1, *shape, dtype=dtype, device=device))
            self.out = blank.expand(total, *blank.shape[1:]).clone()

    def buffer(self, rows: int) -> tuple[torch.Tensor, bool]:
        """A flat buffer (with a spare last slot) for a pass of ``rows`` rows, and whether it is the whole stack
        (then rows are addressed by their own index, else by their place in the pass)."""
        if self.map_fn is None:
            return self.flat, True
        return torch.zeros(rows * self.shape[0] * self.shape[1] * self.shape[2] + 1, dtype=self.dtype,
                           device=self.device), False

    def done(self, rows: torch.Tensor, flat: torch.Tensor, whole: bool) -> None:
        """The pass's buffer from :meth:`buffer` is filled: reduce it into the rows' places (a no-op when whole)."""
        if not whole:
            self.out[rows] = self.map_fn(flat[:-1].view(len(rows), *self.shape))

    def put(self, rows: torch.Tensor, maps: torch.Tensor) -> None:
        """Whole maps of ``rows``, ``(len(rows), C, H, W)``."""
        self.out[rows] = maps if self.map_fn is None else self.map_fn(maps)


def _crop_maps(model: nn.Module, x: torch.Tensor, layer: str, sink: _Sink, img: torch.Tensor, cols: list[int],
               i: list[int], j: list[int], todo: list[int], steps: list | None, rf: tuple[int, ...],
               crop: tuple[int, int], channels: int, rows_per_pass: int) -> None:
    """Write the maps of rows ``todo`` into ``sink`` from receptive-field crops: by :func:`chain_backward` where
    the steps of a verified chain are known (``steps``), else by autograd through a forward of each crop."""
    sy, sx, up, _, left, _ = rf
    ch, cw = crop
    h, w = x.shape[2:]
    y0 = [min(max(0, ii * sy - -(-up // sy) * sy), h - ch) for ii in i]
    x0 = [min(max(0, jj * sx - -(-left // sx) * sx), w - cw) for jj in j]
    # every crop starts on the stride grid, so crops are windows of one strided view (gathered in one index op)
    windows = x.unfold(2, ch, sy).unfold(3, cw, sx)  # (N, C, ny, nx, ch, cw), a view
    for start in range(0, len(todo), rows_per_pass):
        rows = todo[start:start + rows_per_pass]
        rr = torch.as_tensor(rows, device=x.device)
        flat, whole = sink.buffer(len(rows))
        out_windows = flat[:-1].view(-1, *sink.shape).unfold(2, ch, sy).unfold(3, cw, sx)
        at = rr if whole else torch.arange(len(rows), device=x.device)
        cy = torch.as_tensor([y0[r] // sy for r in rows], device=x.device)
        cx = torch.as_tensor([x0[r] // sx for r in rows], device=x.device)
        if steps is not None:  # a verified chain that plan_chain does not cover: the steps one by one
            g = chain_backward(steps, (ch, cw), (sy, sx), img[rr], cy, cx,
                               torch.as_tensor([cols[r] for r in rows], device=x.device),
                               torch.as_tensor([i[r] for r in rows], device=x.device) - cy,
                               torch.as_tensor([j[r] for r in rows], device=x.device) - cx, channels, x.dtype)
            out_windows[at, :, cy, cx] = g
            sink.done(rr, flat, whole)
            continue
        crops = _fast_layout(windows[img[rr], :, cy, cx]).requires_grad_(True)  # (rows, C, ch, cw)
        _, st = _forward(model, crops, [layer], stop=True)
        ac = st[layer]
        ar = torch.arange(len(rows), device=ac.device)
        ci = torch.as_tensor([i[r] for r in rows], device=ac.device) - cy
        cj = torch.as_tensor([j[r] for r in rows], device=ac.device) - cx
        value = ac[ar, torch.as_tensor([cols[r] for r in rows], device=ac.device), ci, cj]
        g = torch.autograd.grad(value.sum(), crops)[0]
        out_windows[at, :, cy, cx] = g  # each row writes only its own map
        sink.done(rr, flat, whole)


def _zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero vector; large CPU ones from an anonymous memory map (already zero, so no fill pass), advised to
    use huge pages where the kernel offers them (one page fault per 2 MiB instead of per 4 KiB) — for the
    ``(N, U, C, H, W)`` map stack, whose zeroing costs as much as a tenth of the maps' computation."""
    import mmap

    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < 2**22 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(numel, dtype=dtype, device=device)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # not offered here: ordinary pages, still zero
            pass
    return torch.frombuffer(buf, dtype=dtype, count=numel)  # the tensor keeps the map alive


def _plan_maps(plan: ChainPlan, x: torch.Tensor, a: torch.Tensor, img: torch.Tensor, cols: list[int],
               pos: torch.Tensor, todo: list[int], rows_per_pass: int, sink: _Sink) -> None:
    """The maps of the rows ``todo`` by :func:`plan_backward` into ``sink`` (other rows stay 0): each row's
    input region written into its map, the part that overhangs the image dropped (it sends to a spare slot)."""
    n, c, h, w = x.shape
    (ry, rx), (oy, ox), (hz, wz) = plan.ratio, plan.offset, plan.size
    # where each region element goes, per target position (i, j): offset in a row's map, or a huge value
    # (clamped to the spare slot) outside the image
    th, tw = a.shape[2:]
    ys = (torch.arange(th, device=x.device) * ry + oy)[:, None] + torch.arange(hz, device=x.device)  # (th, hz)
    xs = (torch.arange(tw, device=x.device) * rx + ox)[:, None] + torch.arange(wz, device=x.device)  # (tw, wz)
    inside = ((ys >= 0) & (ys < h))[:, None, None, :, None] & ((xs >= 0) & (xs < w))[None, :, None, None, :]
    table = ((torch.arange(c, device=x.device) * (h * w))[None, None, :, None, None]
             + (ys * w)[:, None, None, :, None] + xs[None, :, None, None, :])
    table = torch.where(inside, table, torch.full((), 2**62, device=x.device)).view(th * tw, c, hz, wz)
    unit = torch.as_tensor(cols, device=x.device)
    pi, pj = pos // a.shape[3], pos % a.shape[3]
    for start in range(0, len(todo), rows_per_pass):
        rr = torch.as_tensor(todo[start:start + rows_per_pass], device=x.device, dtype=torch.int64)
        g = plan_backward(plan, img[rr], unit[rr], pi[rr], pj[rr], a.shape[1], x.dtype)
        flat, whole = sink.buffer(len(rr))
        at = rr if whole else torch.arange(len(rr), device=x.device)
        index = table[pos[rr]].add_((at * (c * h * w))[:, None, None, None]).clamp_(max=flat.numel() - 1)
        flat[index] = g
        sink.done(rr, flat, whole)


def _unit_rows(model: nn.Module, xr: torch.Tensor, cols: list[int], layer: str, reduce: str, wrt: str | None,
               relevance: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``i`` of ``xr`` explains unit ``cols[i]``: one truncated forward, one backward for all rows."""
    xr = xr.detach().clone().requires_grad_(True)
    _, store = _forward(model, xr, [layer] + ([wrt] if wrt else []), stop=True)
    a = store[layer]
    rows = torch.arange(a.shape[0], device=a.device)
    phi = _reduce(a[rows, torch.as_tensor(cols, device=a.device)], reduce)
    wrt_t = store[wrt] if wrt else xr
    seed = torch.autograd.grad(phi.sum(), a, retain_graph=True)[0]
    if relevance:
        seed = seed * a.detach()
    return torch.autograd.grad(a, wrt_t, grad_outputs=seed)[0], wrt_t.detach()


def target_scores(model: nn.Module, x: torch.Tensor, target: Target, *, units: list[int] | None = None) -> torch.Tensor:
    """``(N, T)`` explained values without gradients: the target logit(s) (T = 1) or every unit's φ (T = U).

    For a unit target the forward stops at the layer. ``units`` fixes the unit list (else from the target).
    """
    with torch.no_grad():
        if isinstance(target, RowUnitTarget):
            _, store = _forward(model, x, [target.layer], stop=True)
            a = store[target.layer]
            cols = torch.as_tensor([int(u) for u in target.units], device=a.device)
            if cols.numel() != a.shape[0]:  # a batch of stacked copies (occlusion, LIME): repeat the unit list
                cols = cols.repeat(a.shape[0] // max(cols.numel(), 1))
            return _reduce(a[torch.arange(a.shape[0], device=a.device), cols], target.reduce)[:, None]
        if isinstance(target, UnitTarget):
            _, store = _forward(model, x, [target.layer], stop=True)
            a = store[target.layer]
            chosen = units if units is not None else _units(target, a.shape[1])
            a = a[:, chosen]
            if a.ndim == 2:
                return a
            return a.flatten(2).mean(2) if target.reduce == "mean" else a.flatten(2).amax(2)
        out = model(x)
        t = class_indices(target, x.shape[0], out.shape[1]).to(out.device)
        return out.gather(1, t[:, None])


def resolve_units(model: nn.Module, x: torch.Tensor, target: UnitTarget) -> list[int]:
    """The unit list a :class:`UnitTarget` means for this model (``None`` → every unit of the layer)."""
    return _units(target, _layer_channels(model, x, target.layer))


ScoreFn = Callable[[torch.Tensor], torch.Tensor]
