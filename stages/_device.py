"""Which torch device a stage computes on, what class of device that is, and the kernel settings that make
its results reproducible.

* :func:`resolve_device` — ``"auto" | "cpu" | "cuda" | "cuda:N"`` → a checked ``torch.device``.
* :func:`device_class` — what a cache key records about the device: ``"cpu"``, ``"mps"`` or
  ``"cuda:<name> (sm_<major><minor>)"``. Results differ across these classes (different kernels, different
  summation orders), so the stages that run a network key on it.
* :func:`determinism_mode` — ``"deterministic"`` where the same class gives the same bits run after run,
  ``"warn-only"`` for CUDA training without ``CUBLAS_WORKSPACE_CONFIG`` (cuBLAS may then pick a
  non-deterministic reduction), ``"best-effort"`` on MPS.
* :func:`reproducible_kernels` — TF32 off (float32 convolutions and matmuls in full precision; on Ampere
  and later CUDA's default convolutions otherwise round inputs to 10-bit mantissas, ~1e-3 relative error)
  and deterministic cuDNN without autotuning, for as long as any thread is inside it.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from ._cpu_kernels import cpu_kernel_class
from ._errors import StageInputError
from ._torch_build import torch_build

__all__ = ["resolve_device", "device_class", "determinism_mode", "reproducible_kernels", "set_deterministic_algorithms", "check_device_params",
           "DETERMINISTIC_CUBLAS"]

#: ``CUBLAS_WORKSPACE_CONFIG`` values under which cuBLAS is deterministic (CUDA ≥ 10.2)
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → the first CUDA device when available, else the CPU; other names are checked.

    Raises:
        StageInputError: for an unparseable name or a CUDA device this process cannot see.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise StageInputError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise StageInputError(f"device {device!r} requested but CUDA is not available here; use 'auto' or 'cpu'")
        count = torch.cuda.device_count()
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        elif resolved.index >= count:
            raise StageInputError(f"device {device!r} requested but only {count} CUDA device(s) are visible")
    return resolved


def device_class(device: str | torch.device = "auto") -> str:
    """The class of ``device`` a cache key records: ``"cpu"``, ``"mps"`` or ``"cuda:<name> (sm_XY)"``.

    Two CUDA devices of one model and compute capability run the same kernels; anything else may not.
    """
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        major, minor = torch.cuda.get_device_capability(resolved)
        return f"cuda:{torch.cuda.get_device_name(resolved)} (sm_{major}{minor})"
    return resolved.type


def determinism_mode(device: str | torch.device = "auto", *, training: bool) -> str:
    """``"deterministic"``, ``"warn-only"`` or ``"best-effort"`` for computing on ``device``.

    CPU: deterministic (for a fixed thread count in training). CUDA: inference is deterministic under
    :func:`reproducible_kernels`; training is too when ``CUBLAS_WORKSPACE_CONFIG`` is one of
    :data:`DETERMINISTIC_CUBLAS` in the worker's environment, else ``"warn-only"`` (torch warns about, rather
    than refuses, non-deterministic operations). Other devices (MPS): best effort.
    """
    resolved = resolve_device(device)
    if resolved.type == "cpu":
        return "deterministic"
    if resolved.type == "cuda":
        if not training or os.environ.get("CUBLAS_WORKSPACE_CONFIG") in DETERMINISTIC_CUBLAS:
            return "deterministic"
        return "warn-only"
    return "best-effort"


def check_device_params(params: dict, device: str | torch.device, *, training: bool) -> None:
    """Refuse to compute a node whose key names another device class, determinism mode, torch release or CPU
    kernel family than this worker's.

    ``params``: the node's parameters (``device``, ``determinism``, ``torch`` and, on the CPU, ``cpu_kernels``
    keys; absent = not keyed, no check).

    Raises:
        StageInputError: naming the key's device and this worker's, and the fix.
    """
    want_device, want_mode = params.get("device"), params.get("determinism")
    if want_device is None:
        return
    have_device = device_class(device)
    if have_device != want_device:
        raise StageInputError(
            f"this node's cache key says it is computed on {want_device!r}, but this worker computes on "
            f"{have_device!r} (results differ across device classes); run on workers of one device class, or "
            "set [execution].device to pick one"
        )
    want_torch = params.get("torch")
    if want_torch is not None and want_torch != (have_torch := torch_build()):
        raise StageInputError(
            f"this node's cache key says it is computed by {want_torch!r}, but this worker runs {have_torch!r} "
            "(torch releases change kernels and their bits); install the same torch on every worker and where the "
            "run starts"
        )
    want_kernels = params.get("cpu_kernels")
    if want_kernels is not None and have_device == "cpu" and want_kernels != (have_kernels := cpu_kernel_class()):
        raise StageInputError(
            f"this node's cache key says it is computed by CPU kernels {want_kernels!r}, but this worker's are "
            f"{have_kernels!r} (torch's CPU kernels differ in their bits across instruction sets); run on workers of "
            "one CPU kind, or cap every worker and the process that starts the run at one level with the same "
            "ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA (e.g. avx2 and AVX2)"
        )
    have_mode = determinism_mode(device, training=training)
    if want_mode is not None and have_mode != want_mode:
        raise StageInputError(
            f"this node's cache key says determinism {want_mode!r}, but this worker gives {have_mode!r}; set "
            f"CUBLAS_WORKSPACE_CONFIG={DETERMINISTIC_CUBLAS[0]} the same way on every worker and where the run starts"
        )


_LOCK = threading.Lock()
_USERS = 0
_SAVED: tuple | None = None


def _precision_api() -> bool:
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


def _read() -> tuple:
    cudnn = torch.backends.cudnn
    if _precision_api():
        precision = (torch.backends.cuda.matmul.fp32_precision, cudnn.conv.fp32_precision)
    else:
        precision = (torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32)
    return precision, cudnn.benchmark, cudnn.deterministic


def _write(precision: tuple, benchmark: bool, deterministic: bool) -> None:
    cudnn = torch.backends.cudnn
    if _precision_api():
        torch.backends.cuda.matmul.fp32_precision, cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32 = precision
    cudnn.benchmark, cudnn.deterministic = benchmark, deterministic


@contextmanager
def reproducible_kernels() -> Iterator[None]:
    """Full float32 precision (no TF32) and deterministic, non-autotuned cuDNN while any thread is inside.

    The settings are process-wide in torch, so they are taken when the first thread enters and restored
    when the last one leaves (threads of one Dask worker share them safely).
    """
    global _USERS, _SAVED
    with _LOCK:
        if _USERS == 0:
            _SAVED = _read()
            _write(("ieee", "ieee") if _precision_api() else (False, False), False, True)
        _USERS += 1
    try:
        yield
    finally:
        with _LOCK:
            _USERS -= 1
            if _USERS == 0 and _SAVED is not None:
                _write(*_SAVED)
                _SAVED = None


def set_deterministic_algorithms(mode: bool, *, warn_only: bool = False) -> None:
    """``torch.use_deterministic_algorithms(mode, warn_only=...)`` without importing ``torch._inductor``.

    The public function also sets ``torch._inductor.config.deterministic`` and so imports inductor, which
    imports ``torch._dynamo``, sympy and triton (+150 MB resident on torch 2.14) — for a setting that only
    ``torch.compile``'d code reads. The eager flag is set here directly; inductor's is set too when inductor
    is already loaded (a process that compiles), so nothing a compiled graph sees changes either.
    """
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:  # a torch without the private setter: the public function
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
        return
    setter(mode, warn_only=warn_only)
    inductor_config = sys.modules.get("torch._inductor.config")
    if inductor_config is not None:
        inductor_config.deterministic = mode
