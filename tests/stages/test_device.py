"""Device classes, determinism modes and reproducible kernels; CPU and GPU extraction agree to 1e-4."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from repdissect.datasets import Batch, ConceptDataset
from repdissect.stages import (StageInputError, build_model, check_device_params, cpu_kernel_class, determinism_mode,
                               device_class, extract_shard, reproducible_kernels)
from repdissect.stages._models import ModelSpec

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device is visible on this host; the CPU-vs-GPU agreement needs one"


class NoiseImages(ConceptDataset):
    """Deterministic random uint8 images."""

    kind = "test-noise"

    def __init__(self, images: int = 24, size: int = 32) -> None:
        self.n, self.size = images, size

    def __len__(self) -> int:
        return self.n

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def seg_size(self) -> tuple[int, int]:
        return self.image_size

    @property
    def concepts(self):
        return []

    def digest(self) -> str:
        return f"noise-{self.n}-{self.size}"

    def load(self, indices: np.ndarray) -> Batch:
        indices = np.asarray(indices, dtype=np.int64)
        images = np.stack([np.random.default_rng(int(i)).integers(0, 256, (3, self.size, self.size), dtype=np.uint8)
                           for i in indices])
        return Batch(index=indices, images=images)


def test_cpu_class_and_modes():
    assert device_class("cpu") == "cpu"
    assert determinism_mode("cpu", training=True) == determinism_mode("cpu", training=False) == "deterministic"


@pytest.mark.parametrize("params, error", [
    ({}, None),
    ({"device": "cpu", "determinism": "deterministic"}, None),
    ({"device": "cpu"}, None),
    ({"device": "cuda:NVIDIA H100 (sm_90)", "determinism": "deterministic"},
     r"key says it is computed on 'cuda:NVIDIA H100 \(sm_90\)', but this worker computes on 'cpu'"),
    ({"device": "mps", "determinism": "best-effort"}, "computed on 'mps'"),
    ({"device": "cpu", "determinism": "warn-only"}, "key says determinism 'warn-only', but this worker gives "
                                                    "'deterministic'; set CUBLAS_WORKSPACE_CONFIG=:4096:8"),
])
def test_check_device_params(params, error):
    if error is None:
        check_device_params(params, "cpu", training=True)
    else:
        with pytest.raises(StageInputError, match=error):
            check_device_params(params, "cpu", training=True)


def test_a_cpu_node_is_refused_by_a_worker_with_other_cpu_kernels(monkeypatch):
    here = cpu_kernel_class()
    check_device_params({"device": "cpu", "determinism": "deterministic", "cpu_kernels": here}, "cpu", training=True)
    with pytest.raises(StageInputError, match=r"computed by CPU kernels 'x86_64 aten=avx512 onednn=avx512', but this "
                                              r"worker's are .*ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA"):
        check_device_params({"device": "cpu", "cpu_kernels": "x86_64 aten=avx512 onednn=avx512"}, "cpu",
                            training=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX")  # read afresh on every call: a cap set later is honoured
    if here.startswith("x86_64") and "onednn=sse41" not in here:
        assert cpu_kernel_class() == here.rsplit("onednn=", 1)[0] + "onednn=avx"


_PROBE = """
import os, sys, torch
from repdissect.stages import cpu_kernel_class
torch.nn.functional.conv2d(torch.rand(2, 3, 16, 16), torch.rand(4, 3, 3, 3))
print("CLASS", cpu_kernel_class(), torch.backends.cpu.get_cpu_capability())
"""


def _isa_level(text: str) -> str:
    for marker, level in (("AVX-512", "avx512"), ("AVX512", "avx512"), ("AVX10", "avx512"), ("AVX2", "avx2"),
                          ("AVX", "avx"), ("SSE4.1", "sse41")):
        if marker in text:
            return level
    raise AssertionError(f"unknown oneDNN ISA {text!r}")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 kernel levels only")
@pytest.mark.parametrize("caps", [{}, {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
                                  {"ONEDNN_MAX_CPU_ISA": "AVX"}])
def test_cpu_kernel_class_names_what_torch_and_onednn_dispatch_to(caps):
    """Two readings of one fact must agree: ours, from the CPU's flags without torch, and torch's own (ATen's
    capability; the ISA oneDNN reports when it runs a convolution)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                           "DNNL_MAX_CPU_ISA")}
    env.update(caps, ONEDNN_VERBOSE="1")
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith("CLASS "))
    _, machine, aten, onednn, capability = line.split()
    assert aten == f"aten={capability.lower()}"
    isa = next((l.split("isa:", 1)[1] for l in proc.stdout.splitlines() if "isa:" in l), None)
    if isa is None:
        pytest.skip("this torch's oneDNN prints no ISA line")
    assert onednn == f"onednn={_isa_level(isa)}"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 kernel levels only")
def test_cpu_kernel_families_differ_in_their_bits():
    """Why the family is keyed: one convolution, on this host's kernels and capped at SSE4.1, gives other bits."""
    code = ("import hashlib, torch; g = torch.Generator().manual_seed(0); "
            "x = torch.rand(8, 16, 32, 32, generator=g); w = torch.rand(32, 16, 3, 3, generator=g); "
            "print(hashlib.sha256(torch.nn.functional.conv2d(x, w, padding=1).numpy().tobytes()).hexdigest())")
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    if "onednn=sse41" in cpu_kernel_class():
        pytest.skip("this CPU runs oneDNN's lowest level already")
    digests = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env=dict(env, **caps)).stdout for caps in ({}, {"ONEDNN_MAX_CPU_ISA": "SSE41"})]
    assert digests[0] and digests[1] and digests[0] != digests[1]


def _flags() -> tuple:
    cudnn = torch.backends.cudnn
    if hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(cudnn, "conv"):
        precision = (torch.backends.cuda.matmul.fp32_precision, cudnn.conv.fp32_precision)
    else:
        precision = (torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32)
    return precision, cudnn.benchmark, cudnn.deterministic


def test_reproducible_kernels_turn_tf32_off_while_any_thread_is_inside():
    before = _flags()
    off = (("ieee", "ieee") if isinstance(before[0][0], str) else (False, False), False, True)
    inside, leave_first, first_left = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first() -> None:
        with reproducible_kernels():
            inside.set()
            leave_first.wait(30)
        first_left.set()

    thread = threading.Thread(target=first)
    thread.start()
    assert inside.wait(30)
    with reproducible_kernels():
        seen["both"] = _flags()
        leave_first.set()
        assert first_left.wait(30)
        seen["second only"] = _flags()  # the first thread left: the settings must hold for this one
    thread.join(30)
    assert seen == {"both": off, "second only": off}
    assert _flags() == before


def test_cpu_extraction_is_bit_identical_across_thread_counts():
    """Why CPU extraction keys no thread count (CPU training does: its weights differ between 1 and 2 threads)."""
    net = build_model(ModelSpec("builtin:cnn", {"depth": 3, "width": 8}), seed=0, num_classes=4)
    data = NoiseImages()
    previous = torch.get_num_threads()
    outputs = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = extract_shard(net, ["conv1", "conv3"], data, np.arange(len(data)), batch_size=8, device="cpu")
            outputs[threads] = {k: v.activations.column("activations").combine_chunks().flatten().to_numpy()
                                for k, v in out.items()}
    finally:
        torch.set_num_threads(previous)
    for layer in ("conv1", "conv3"):
        np.testing.assert_array_equal(outputs[1][layer], outputs[2][layer])


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("spec, layers, size", [
    (ModelSpec("builtin:cnn", {"depth": 3, "width": 16}), ["conv1", "conv2", "conv3", "fc"], 32),
    (ModelSpec("torchvision:resnet18", num_classes=10), ["layer1", "layer3", "layer4", "fc"], 64),
], ids=["builtin", "resnet18"])
def test_cpu_and_gpu_extraction_agree_to_1e4(spec, layers, size):
    net = build_model(spec, seed=0)
    data = NoiseImages(images=16, size=size)
    got = {}
    for device in ("cpu", "cuda"):
        out = extract_shard(net, layers, data, np.arange(len(data)), batch_size=8, device=device)
        got[device] = {k: v.activations.column("activations").combine_chunks().flatten().to_numpy() for k, v in out.items()}
        net = net.cpu()
    for layer in layers:
        cpu, gpu = got["cpu"][layer], got["cuda"][layer]
        scale = max(1.0, float(np.abs(cpu).max()))
        np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-4 * scale, err_msg=f"layer {layer}")
