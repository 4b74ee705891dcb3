"""What the keys of the network stages (``train``, ``extract``) record about the hardware.

A network's outputs are not bit-identical across device classes: a GPU's convolution kernels sum in other
orders than the CPU's (and cuDNN's choice depends on the GPU model), and CUDA training is reproducible only
with ``CUBLAS_WORKSPACE_CONFIG`` set. So the device class and its determinism mode are part of those keys —
a cache filled on a GPU host is never served to a CPU run as identical — and, for CPU training, the torch
thread count (measured: 1 and 2 threads give different weights; CPU extraction is bit-identical across
thread counts, tested), and, on the CPU, the family of kernels torch dispatches to there (instruction-set
levels of ATen and oneDNN: an AVX-512 host and an AVX2 host train and extract other bits; see
``repdissect.stages.cpu_kernel_class``); on every device, the installed torch release
(``repdissect.stages.torch_build``). Everything downstream inherits the difference through the upstream keys.

The class is probed where the work will run, once per plan: in this process for ``local``/``sync``
schedulers, on the workers (those advertising a ``GPU`` resource; for CPU work, every worker's CPU kernels and
torch) for a scheduler address. Probing the CPU-only case never imports torch, so a fully cached rerun stays
fast.
"""

from __future__ import annotations

import glob
import sys
from dataclasses import dataclass, field
from typing import Any

from ..core import PipelineError

__all__ = ["DeviceKey", "probe_device"]


def _cpu_kernel_class() -> str:
    from ..stages import cpu_kernel_class  # torch-free: reads the CPU's flags

    return cpu_kernel_class()


def _torch_build() -> str:
    from ..stages import torch_build  # torch-free: reads the installed distribution's version

    return torch_build()


@dataclass(frozen=True)
class DeviceKey:
    """The device facts keyed by the network stages.

    ``device``: ``"cpu"``, ``"mps"`` or ``"cuda:<name> (sm_XY)"``; ``train_mode``/``extract_mode``:
    ``"deterministic"``, ``"warn-only"`` or ``"best-effort"`` (see ``repdissect.stages.determinism_mode``);
    ``threads``: torch threads per task (keyed for CPU training only); ``cpu_kernels``: the CPU kernel family
    (keyed for CPU training and extraction; default: this host's); ``torch``: the torch release (keyed for
    training and extraction on every device; default: this environment's).
    """

    device: str = "cpu"
    train_mode: str = "deterministic"
    extract_mode: str = "deterministic"
    threads: int = 1
    cpu_kernels: str = field(default_factory=_cpu_kernel_class)
    torch: str = field(default_factory=_torch_build)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def train_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"device": self.device, "determinism": self.train_mode, "torch": self.torch}
        if self.device == "cpu":
            params["threads"] = self.threads
            params["cpu_kernels"] = self.cpu_kernels
        return params

    def extract_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"device": self.device, "determinism": self.extract_mode, "torch": self.torch}
        if self.device == "cpu":
            params["cpu_kernels"] = self.cpu_kernels
        return params



def _cuda_impossible() -> bool:
    """True when this host certainly has no usable CUDA device, decided without importing torch."""
    if "torch" in sys.modules:
        return False  # ask torch itself, it is loaded anyway
    if sys.platform == "darwin":
        return True
    return sys.platform.startswith("linux") and not glob.glob("/dev/nvidia[0-9]*")


def _probe_here(requested: str) -> dict[str, str]:
    """Device class and determinism modes of this process for ``[execution].device = requested``."""
    if requested == "cpu" or (requested == "auto" and _cuda_impossible()):
        return {"device": "cpu", "train_mode": "deterministic", "extract_mode": "deterministic",
                "torch": _torch_build()}
    from ..stages import StageInputError, determinism_mode, device_class

    try:
        return {"device": device_class(requested), "train_mode": determinism_mode(requested, training=True),
                "extract_mode": determinism_mode(requested, training=False), "torch": _torch_build()}
    except StageInputError:
        return {"device": "none"}


def _probe_workers(scheduler: str, requested: str, threads: int) -> dict[str, str] | None:
    """The GPU workers' common device class behind a scheduler address; ``None`` when no worker has a GPU."""
    from ._executor import _gpu_addresses, connect

    client, _ = connect(scheduler, workers=1, threads_per_worker=threads, gpu=False)
    try:
        gpus = _gpu_addresses(client)
        if not gpus:
            return None
        found = client.run(_probe_here, "cuda", workers=gpus)
    finally:
        client.close()
    broken = sorted(w for w, v in found.items() if v["device"] == "none")
    if broken:
        raise PipelineError(
            f"worker(s) {', '.join(broken)} advertise a GPU resource but torch sees no CUDA device there; "
            "start them without --resources GPU=1, or fix their CUDA installation"
        )
    kind = _one_kind({w: tuple(sorted(v.items())) for w, v in found.items()},
                     lambda v: f"{dict(v)['device']}, {dict(v).get('train_mode')}, {dict(v).get('torch')}",
                     "GPU workers differ in device class, determinism mode or torch release",
                     "Use workers of one GPU model with the same CUBLAS_WORKSPACE_CONFIG and the same torch, or "
                     "[execution].device = \"cpu\"")
    return dict(kind)


def _one_kind(found: dict[str, Any], describe: Any, differ: str, fix: str) -> Any:
    """The one value every worker reported (``found``: worker → value), else a PipelineError listing each."""
    kinds = set(found.values())
    if len(kinds) > 1:
        listing = "; ".join(f"{w}: {describe(v)}" for w, v in sorted(found.items()))
        raise PipelineError(f"the scheduler's {differ} ({listing}); results would depend on which worker ran a "
                            f"task. {fix}")
    return next(iter(kinds))


def _cpu_worker_facts() -> tuple[str, str]:
    """What a CPU worker's results depend on: its CPU kernel family and its torch release (run on each worker)."""
    return _cpu_kernel_class(), _torch_build()


def _probe_cpu_workers(scheduler: str, threads: int) -> tuple[str, str]:
    """The CPU kernel family and torch release common to every worker behind a scheduler address (they run
    the CPU work)."""
    from ._executor import connect

    client, _ = connect(scheduler, workers=1, threads_per_worker=threads, gpu=False)
    try:
        found = {worker: tuple(facts) for worker, facts in client.run(_cpu_worker_facts).items()}
    finally:
        client.close()
    if not found:
        return _cpu_worker_facts()
    kernels = _one_kind({w: v[0] for w, v in found.items()}, str, "workers run different CPU kernels",
                        "Use workers of one CPU kind, or start every worker with the same ATEN_CPU_CAPABILITY and "
                        "ONEDNN_MAX_CPU_ISA at a level all of them have (e.g. avx2 and AVX2)")
    torch = _one_kind({w: v[1] for w, v in found.items()}, str, "workers run different torch releases",
                      "Install the same torch on every worker")
    return kernels, torch


def probe_device(execution: Any) -> DeviceKey:
    """The :class:`DeviceKey` of a run with ``execution`` (the ``[execution]`` section).

    Raises:
        PipelineError: ``device = "cuda"`` with no CUDA device here (nor on any worker), or GPU workers of
            different classes, or workers that differ in CPU kernels or torch release.
    """
    requested, threads = execution.device, int(execution.threads_per_worker)
    remote = execution.scheduler not in ("auto", "local", "sync")
    found: dict[str, str] | None = None
    if requested != "cpu" and remote:
        found = _probe_workers(execution.scheduler, requested, threads)
    elif requested != "cpu":
        found = _probe_here(requested)
        if found["device"] in ("none", "cpu"):
            found = None
    if found is None:
        if requested == "cuda":
            where = "the scheduler's workers advertise no GPU resource" if remote else "no CUDA device is visible here"
            raise PipelineError(f"[execution].device = \"cuda\" but {where}; use device = \"auto\" or \"cpu\""
                                + (", or start workers with --resources GPU=1" if remote else ""))
        kernels, torch = _probe_cpu_workers(execution.scheduler, threads) if remote else _cpu_worker_facts()
        return DeviceKey(device="cpu", threads=threads, cpu_kernels=kernels, torch=torch)
    return DeviceKey(device=found["device"], train_mode=found["train_mode"], extract_mode=found["extract_mode"],
                     threads=threads, torch=found["torch"])
