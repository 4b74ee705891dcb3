"""Which family of CPU kernels torch runs here: the part of a CPU's identity that changes a network's bits.

torch picks its CPU kernels at run time by instruction set, twice: ATen's vectorised operators (``DEFAULT``,
``AVX2``, ``AVX512`` on x86) and oneDNN's convolutions (SSE4.1, AVX, AVX2, AVX-512). The kernels of different
levels sum in different orders, so one training step or one convolution gives other bits on an AVX-512 host
than on an AVX2 host (measured on an AVX2 machine: forcing ATen to its default kernels, or oneDNN to AVX or
SSE4.1, changed a five-step training's weights and a single convolution's output). The network stages key on
:func:`cpu_kernel_class` so a cache filled on one kind of CPU is never served to another as identical.

The constraint: the pipeline probes this before it knows whether any work is left, so it never imports torch;
it reads the CPU's flags (``/proc/cpuinfo`` on Linux) and the two environment overrides torch honours
(``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA``), each level capped by its override.
Not keyed, because not shown to change results: the CPU model within one level, and its cache sizes.
"""

from __future__ import annotations

import functools
import os
import platform

__all__ = ["cpu_kernel_class"]

# x86 levels, lowest first; each needs the flags of its own row (Linux /proc/cpuinfo names).
_X86_LEVELS = (
    ("sse41", {"sse4_1"}),
    ("avx", {"avx"}),
    ("avx2", {"avx2", "fma"}),
    ("avx512", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
)
_ORDER = ("baseline", *(name for name, _ in _X86_LEVELS))


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 ``flags``, ARM ``Features``) from ``/proc/cpuinfo``; empty elsewhere. Read
    once per process: every task's device check asks again, and the CPU does not change under it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def _hardware_level(flags: frozenset[str]) -> str:
    level = "baseline"
    for name, needs in _X86_LEVELS:
        if needs <= flags:
            level = name
    return level


def _capped(level: str, override: str | None) -> str:
    """``level`` lowered to an override's level (names as torch and oneDNN spell them, any case)."""
    if not override:
        return level
    name = override.strip().lower()
    if name in ("all", ""):
        return level
    if name == "default":
        cap = "baseline"
    elif name.startswith(("avx512", "avx10")):
        cap = "avx512"
    elif name.startswith("avx2"):
        cap = "avx2"
    elif name.startswith("avx"):
        cap = "avx"
    elif name.startswith("sse4"):
        cap = "sse41"
    else:
        return f"{level}?{name}"  # unknown to this table: keyed verbatim, never guessed equal to another
    return min(level, cap, key=_ORDER.index)


@functools.lru_cache(maxsize=None)
def _cached_class(machine: str, flags: frozenset[str], aten: str | None, onednn: str | None,
                  processor: str = "") -> str:
    if not flags:  # no /proc/cpuinfo (macOS, Windows): the processor's own name, a finer class than needed
        caps = "".join(f" {name}={value}" for name, value in (("aten", aten), ("onednn", onednn)) if value)
        return f"{machine} {processor or 'unknown processor'}{caps}"
    if machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        level = _hardware_level(flags)
        # ATen has kernels for AVX2 and AVX-512 only; below AVX2 it runs its default (compiler-vectorised) ones
        aten_level = _capped(level if level in ("avx2", "avx512") else "baseline", aten)
        aten_level = "default" if aten_level in ("baseline", "sse41", "avx") else aten_level
        return f"{machine} aten={aten_level} onednn={_capped(level, onednn)}"
    if machine in ("aarch64", "arm64"):
        return f"{machine} {'sve' if 'sve' in flags else 'asimd'}" + (f" aten={aten.lower()}" if aten else "")
    return machine or "unknown"


def cpu_kernel_class() -> str:
    """What a cache key records about this host's CPU kernels, e.g. ``"x86_64 aten=avx2 onednn=avx2"``.

    x86: ``aten=`` is ATen's capability (``default``, ``avx2`` or ``avx512``, as
    ``torch.backends.cpu.get_cpu_capability()`` reports it), ``onednn=`` the level of oneDNN's
    convolutions (``sse41``, ``avx``, ``avx2``, ``avx512``), each from the CPU's flags capped by
    ``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA``. ARM: the architecture and whether it has SVE. Hosts
    without ``/proc/cpuinfo``: the architecture and the processor's name (and any cap that is set).
    """
    machine = platform.machine().lower()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    flags = _cpu_flags()
    processor = "" if flags else platform.processor()  # may spawn a process: only where the flags are missing
    return _cached_class(machine, flags, os.environ.get("ATEN_CPU_CAPABILITY"), onednn, processor)
