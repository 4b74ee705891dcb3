"""The background load of the compiled IoU kernels: started once per process, leaves them ready to call."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

HAS_NUMBA = importlib.util.find_spec("numba") is not None


@pytest.mark.skipif(not HAS_NUMBA, reason="Numba (the optional [fast] extra) is not installed: nothing to warm")
def test_warm_kernels_loads_every_kernel_signature_once_per_process():
    code = (
        "from repdissect.stages import warm_kernels\n"
        "from repdissect.stages import _iou_kernels as k\n"
        "kernels = (k.count_maps, k.prepare_labels, k.add_image_counts)\n"
        "assert not any(kernel.signatures for kernel in kernels)\n"
        "thread = warm_kernels()\n"
        "assert warm_kernels() is thread and thread.daemon\n"
        "thread.join(600)\n"
        "print(*(len(kernel.signatures) for kernel in kernels))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1", "1"]  # the tally's signatures (float32 maps, int32 labels), one each


def test_warm_kernels_without_numba_does_nothing(monkeypatch):
    from repdissect.stages import _warmup

    monkeypatch.setattr(_warmup, "_thread", None)
    monkeypatch.setattr(_warmup.importlib.util, "find_spec", lambda name: None)
    assert _warmup.warm_kernels() is None
