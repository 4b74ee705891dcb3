"""The CPU kernel family a cache key records: levels from the CPU's flags, capped by torch's overrides."""

from __future__ import annotations

import pytest

from repdissect.stages._cpu_kernels import _cached_class

SSE = {"sse4_1"}
AVX = SSE | {"avx"}
AVX2 = AVX | {"avx2", "fma"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


@pytest.mark.parametrize("flags, aten, onednn, expected", [
    (AVX512, None, None, "x86_64 aten=avx512 onednn=avx512"),
    (AVX512 - {"avx512dq"}, None, None, "x86_64 aten=avx2 onednn=avx2"),  # AVX-512 needs all four
    (AVX2, None, None, "x86_64 aten=avx2 onednn=avx2"),
    (AVX2 - {"fma"}, None, None, "x86_64 aten=default onednn=avx"),  # ATen's and oneDNN's AVX2 need FMA
    (AVX, None, None, "x86_64 aten=default onednn=avx"),  # ATen has no AVX-only kernels
    (SSE, None, None, "x86_64 aten=default onednn=sse41"),
    (AVX512, "avx2", "AVX2", "x86_64 aten=avx2 onednn=avx2"),  # a mixed cluster capped at one level...
    (AVX2, "avx2", "AVX2", "x86_64 aten=avx2 onednn=avx2"),  # ...is one family
    (AVX512, "DEFAULT", "avx512_core_amx", "x86_64 aten=default onednn=avx512"),
    (AVX2, "avx512", "AVX512_CORE", "x86_64 aten=avx2 onednn=avx2"),  # a cap never raises a level
    (AVX2, None, "SSE41", "x86_64 aten=avx2 onednn=sse41"),
    (AVX2, None, "ALL", "x86_64 aten=avx2 onednn=avx2"),
    (AVX2, None, "future_isa", "x86_64 aten=avx2 onednn=avx2?future_isa"),  # unknown: keyed as given
])
def test_x86_levels_from_flags_and_caps(flags, aten, onednn, expected):
    assert _cached_class("x86_64", frozenset(flags | {"sse2"}), aten, onednn) == expected


def test_arm_and_hosts_without_cpuinfo():
    assert _cached_class("aarch64", frozenset({"asimd", "sve"}), None, None) == "aarch64 sve"
    assert _cached_class("aarch64", frozenset({"asimd"}), "sve256", None) == "aarch64 asimd aten=sve256"
    assert _cached_class("arm64", frozenset(), None, None, "arm") == "arm64 arm"
    assert _cached_class("amd64", frozenset(), "avx2", None, "Intel64 Family 6") == "amd64 Intel64 Family 6 aten=avx2"

