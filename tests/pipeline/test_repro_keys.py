"""Keys hold what changes results: the IoU union convention, the device class and its determinism mode;
the source-change guard names exactly the stages whose science changed."""

from __future__ import annotations

import numpy as np
import pytest

from repdissect.pipeline import run, status

from helpers import write_tiny_config


def test_iou_union_is_keyed_and_lite_ious_are_higher_or_equal(tmp_path):
    base = write_tiny_config(tmp_path)
    first = run(base)
    lite = tmp_path / "lite.toml"
    lite.write_text(base.read_text().replace("[iou]\n", '[iou]\nunion = "lite"\n'))
    reasons = [s for s in status(lite) if not s.cached]
    assert {s.stage for s in reasons} == {"iou"}
    assert all('param union: "category-images" → "lite"' in s.reason for s in reasons)
    second = run(lite)
    a = first.tables("iou", "unit_label").sort_values(["instance", "layer", "unit", "label"])
    b = second.tables("iou", "unit_label").sort_values(["instance", "layer", "unit", "label"])
    np.testing.assert_array_equal(a["intersection"], b["intersection"])
    np.testing.assert_array_equal(a["truth"], b["truth"])
    assert (b["activation"].to_numpy() <= a["activation"].to_numpy()).all()
    assert (b["iou"].to_numpy() >= a["iou"].to_numpy() - 1e-15).all()
    assert set(second.tables("iou", "summary")["union"]) == {"lite"}
    assert set(first.tables("iou", "summary")["union"]) == {"category-images"}


def test_status_names_the_changed_module_for_exactly_the_stages_using_it(tmp_path, monkeypatch):
    from repdissect.core import get_stage

    config = write_tiny_config(tmp_path)
    run(config)
    assert all(s.reason == "cached" for s in status(config))
    iou = type(get_stage("iou"))
    recorded = iou.source_hashes()
    assert "_iou.py" in recorded
    monkeypatch.setattr(iou, "source_hashes", classmethod(lambda cls, root=None: {**recorded, "_iou.py": "0" * 64}))
    reasons = {s.node_id: s for s in status(config)}
    warned = {s.stage for s in reasons.values() if "warning" in s.reason}
    assert warned == {"iou"}
    assert all(s.cached for s in reasons.values())
    message = next(s.reason for s in reasons.values() if s.stage == "iou")
    assert message.startswith("cached (warning: _iou.py changed since this entry was computed, but the iou stage "
                              "version was not bumped")


# ------------------------------------------------------------------------------------------- device keys
def _plan(config, **kwargs):
    from repdissect.pipeline import load_config
    from repdissect.pipeline._dag import build_plan

    return build_plan(load_config(config), **kwargs)


def test_network_stages_key_device_class_and_determinism(tmp_path):
    plan = _plan(write_tiny_config(tmp_path))
    assert plan.device.device == "cpu" or plan.device.is_cuda
    for node in plan.nodes:
        if node.stage == "train":
            assert node.params["device"] == plan.device.device
            assert node.params["determinism"] in ("deterministic", "warn-only")
            assert ("threads" in node.params) is (plan.device.device == "cpu")
            assert ("cpu_kernels" in node.params) is (plan.device.device == "cpu")
            assert node.params["torch"] == plan.device.torch
        elif node.stage == "extract":
            assert node.params["device"] == plan.device.device and node.params["determinism"] == "deterministic"
            assert "threads" not in node.params
            assert ("cpu_kernels" in node.params) is (plan.device.device == "cpu")
            assert node.params["torch"] == plan.device.torch
        else:
            assert "device" not in node.params


def test_a_gpu_cache_is_never_served_to_a_cpu_run(tmp_path):
    from repdissect.pipeline._device_key import DeviceKey

    config = write_tiny_config(tmp_path)
    cpu = _plan(config, device=DeviceKey())
    gpu = _plan(config, device=DeviceKey(device="cuda:NVIDIA H100 80GB HBM3 (sm_90)", train_mode="warn-only"))
    strict = _plan(config, device=DeviceKey(device="cuda:NVIDIA H100 80GB HBM3 (sm_90)"))
    other = _plan(config, device=DeviceKey(device="cuda:NVIDIA A100-SXM4-40GB (sm_80)", train_mode="warn-only"))
    keys = [{n.node_id: n.key for n in p.nodes} for p in (cpu, gpu, strict, other)]

    def reaches(node, stage):
        return node.stage == stage or any(reaches(up, stage) for up in node.upstream.values())

    for node in cpu.nodes:
        distinct = {k[node.node_id] for k in keys}
        if not reaches(node, "extract") and not reaches(node, "train"):  # the image-centre baseline runs no network
            assert len(distinct) == 1, node.node_id
        elif not reaches(node, "train"):  # random-init networks: the training determinism does not reach them
            assert len(distinct) == 3, node.node_id
        else:
            assert len(distinct) == 4, node.node_id


def test_cpu_training_is_keyed_on_threads_extraction_is_not(tmp_path):
    config = write_tiny_config(tmp_path)
    run(config)
    two = tmp_path / "two.toml"
    two.write_text(config.read_text().replace("[execution]\n", "[execution]\nthreads_per_worker = 2\n"))
    reasons = {s.node_id: s for s in status(two)}
    train = [s for s in reasons.values() if s.stage == "train"]
    assert train and all(not s.cached and s.reason == "param threads: 1 → 2" for s in train)
    random_init = [s for s in reasons.values() if s.stage == "extract" and s.node_id.endswith("-random]")]
    assert random_init and all(s.cached for s in random_init)


def test_cpu_work_is_keyed_on_the_cpu_kernel_family(tmp_path, monkeypatch):
    """An AVX2 host's cache is not an AVX-512 host's: capping ATen's kernels (what another CPU would run)
    changes exactly the keys of the nodes that run a network, and status names the parameter."""
    from repdissect.stages import cpu_kernel_class

    here = cpu_kernel_class()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    if cpu_kernel_class() == here:
        pytest.skip(f"this CPU's kernels ({here}) are already the lowest level: no other family to compare")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    config = write_tiny_config(tmp_path)
    run(config)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    reasons = {s.node_id: s for s in status(config)}
    network = [s for s in reasons.values() if s.stage in ("train", "extract")]
    assert network and all(not s.cached and s.reason.startswith("param cpu_kernels: ") for s in network)
    assert all(s.cached for s in reasons.values() if s.stage == "stability_center")


def test_network_work_is_keyed_on_the_torch_release_and_a_worker_with_another_refuses_it(tmp_path, monkeypatch):
    """Another torch release changes exactly the keys of the nodes that run a network (status names the
    parameter), and a worker whose torch is not the key's refuses to compute such a node."""
    from repdissect.pipeline import PipelineError
    from repdissect.pipeline import _device_key
    from repdissect.stages import StageInputError

    config = write_tiny_config(tmp_path)
    run(config)
    monkeypatch.setattr(_device_key, "_torch_build", lambda: "torch 0.0.1")
    reasons = {s.node_id: s for s in status(config)}
    network = [s for s in reasons.values() if s.stage in ("train", "extract")]
    assert network and all(not s.cached and s.reason.startswith("param torch: ") and '→ "torch 0.0.1"' in s.reason
                           for s in network)
    assert all(s.cached for s in reasons.values() if s.stage == "stability_center")
    with pytest.raises((PipelineError, StageInputError), match=r"computed by 'torch 0\.0\.1', but this worker runs"):
        run(config)


class _FakeClient:
    def __init__(self, found: dict) -> None:
        self.found = found

    def run(self, function, *args, **kwargs):
        return dict(self.found)

    def close(self) -> None:
        pass


_AVX2, _AVX512, _TORCH = "x86_64 aten=avx2 onednn=avx2", "x86_64 aten=avx512 onednn=avx512", "torch 2.14.1"


@pytest.mark.parametrize("found, error", [
    ({"tcp://a:1": (_AVX2, _TORCH), "tcp://b:1": (_AVX2, _TORCH)}, None),
    ({"tcp://a:1": (_AVX2, _TORCH), "tcp://b:1": (_AVX512, _TORCH)},
     r"workers run different CPU kernels \(tcp://a:1: x86_64 aten=avx2 onednn=avx2; tcp://b:1: x86_64 "
     r"aten=avx512 onednn=avx512\).*same ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA"),
    ({"tcp://a:1": (_AVX2, _TORCH), "tcp://b:1": (_AVX2, "torch 2.13.0")},
     r"workers run different torch releases \(tcp://a:1: torch 2\.14\.1; tcp://b:1: torch 2\.13\.0\).*Install the "
     r"same torch on every worker"),
])
def test_a_cluster_keys_its_workers_cpu_kernels_and_torch_and_refuses_a_mix(monkeypatch, found, error):
    from repdissect.pipeline import PipelineError
    from repdissect.pipeline import _executor
    from repdissect.pipeline._config import ExecutionConfig
    from repdissect.pipeline._device_key import probe_device

    monkeypatch.setattr(_executor, "connect", lambda *a, **k: (_FakeClient(found), None))
    execution = ExecutionConfig(scheduler="tcp://127.0.0.1:8786", device="cpu")
    if error is None:
        params = probe_device(execution).extract_params()
        assert (params["cpu_kernels"], params["torch"]) == (_AVX2, _TORCH)
    else:
        with pytest.raises(PipelineError, match=error):
            probe_device(execution)


def test_a_cluster_of_mixed_gpu_models_is_refused(monkeypatch):
    from repdissect.pipeline import PipelineError
    from repdissect.pipeline import _executor
    from repdissect.pipeline._config import ExecutionConfig
    from repdissect.pipeline._device_key import probe_device

    h100 = {"device": "cuda:NVIDIA H100 (sm_90)", "train_mode": "deterministic", "extract_mode": "deterministic",
            "torch": _TORCH}
    found = {"tcp://a:1": h100, "tcp://b:1": dict(h100, device="cuda:NVIDIA A100 (sm_80)")}
    monkeypatch.setattr(_executor, "connect", lambda *a, **k: (_FakeClient(found), None))
    monkeypatch.setattr(_executor, "_gpu_addresses", lambda client: sorted(found))
    with pytest.raises(PipelineError, match=r"GPU workers differ in device class, determinism mode or torch release "
                                            r"\(tcp://a:1: cuda:NVIDIA H100 \(sm_90\), deterministic, torch 2\.14\.1; "
                                            r"tcp://b:1: cuda:NVIDIA A100"):
        probe_device(ExecutionConfig(scheduler="tcp://127.0.0.1:8786", device="auto"))
    found["tcp://b:1"] = dict(h100, torch="torch 2.13.0")
    with pytest.raises(PipelineError, match=r"tcp://b:1: cuda:NVIDIA H100 \(sm_90\), deterministic, torch 2\.13\.0\)"):
        probe_device(ExecutionConfig(scheduler="tcp://127.0.0.1:8786", device="auto"))
    found["tcp://b:1"] = h100
    key = probe_device(ExecutionConfig(scheduler="tcp://127.0.0.1:8786", device="auto"))
    assert (key.device, key.torch) == (h100["device"], _TORCH)


def test_probing_the_cpu_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from repdissect.pipeline import load_config; from repdissect.pipeline._device_key import "
            "probe_device; from repdissect.pipeline._config import ExecutionConfig; "
            "key = probe_device(ExecutionConfig(device='cpu', threads_per_worker=3)); "
            "from repdissect.stages import cpu_kernel_class, torch_build; here = cpu_kernel_class(); "
            "assert key.train_params() == {'device': 'cpu', 'determinism': 'deterministic', 'torch': torch_build(), "
            "'threads': 3, 'cpu_kernels': here}, key; "
            "assert key.extract_params() == {'device': 'cpu', 'determinism': 'deterministic', 'torch': torch_build(), "
            "'cpu_kernels': here}; "
            "assert 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_cuda_requested_without_a_gpu_is_refused():
    import torch

    from repdissect.pipeline import PipelineError
    from repdissect.pipeline._config import ExecutionConfig
    from repdissect.pipeline._device_key import probe_device

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here; the refusal needs a host without one")
    with pytest.raises(PipelineError, match=r'\[execution\].device = "cuda" but no CUDA device is visible here'):
        probe_device(ExecutionConfig(device="cuda", scheduler="sync"))


def test_workers_advertising_a_gpu_they_lack_are_refused():
    import torch
    from distributed import LocalCluster

    from repdissect.pipeline import PipelineError
    from repdissect.pipeline._config import ExecutionConfig
    from repdissect.pipeline._device_key import probe_device

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here; the refusal needs workers without one")
    with LocalCluster(n_workers=1, processes=False, resources={"GPU": 1}, dashboard_address=":0") as cluster:
        with pytest.raises(PipelineError, match="advertise a GPU resource but torch sees no CUDA device there"):
            probe_device(ExecutionConfig(device="auto", scheduler=cluster.scheduler_address))
    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster:
        assert probe_device(ExecutionConfig(device="auto", scheduler=cluster.scheduler_address)).device == "cpu"


def test_a_task_refuses_a_device_its_key_does_not_name(tmp_path):
    from repdissect.pipeline import CacheStore
    from repdissect.pipeline._device_key import DeviceKey
    from repdissect.pipeline._executor import Executor, _SyncClient
    from repdissect.stages import StageInputError

    plan = _plan(write_tiny_config(tmp_path), device=DeviceKey(device="cuda:NVIDIA H100 80GB HBM3 (sm_90)"))
    extract = next(n for n in plan.nodes if n.stage == "extract" and n.label["instance"].endswith("-random"))
    store = CacheStore(tmp_path / "cache")
    executor = Executor(store=store, client=_SyncClient(), dataset_spec=plan.dataset_spec,
                        execution={"shard_size": 64, "resolved_device": "cpu", "torch_threads": 1})
    with pytest.raises(StageInputError, match=r"key says it is computed on 'cuda:NVIDIA H100 80GB HBM3 \(sm_90\)', "
                                              r"but this worker computes on 'cpu'"):
        executor.run([extract])
    assert store.get("extract", extract.key) is None
