"""Cache-key hasher: canonical, stable across processes, refuses what it cannot normalise."""

import dataclasses
import enum
import math
import subprocess
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import pytest

from repdissect.core import UnhashableValueError, canonical_json, digest, normalize


class Color(enum.Enum):
    RED = 1


@dataclasses.dataclass(frozen=True)
class Params:
    quantile: float
    layers: tuple


CASES = [
    ({"b": 1, "a": [1, 2]}, {"a": (1, 2), "b": 1}),  # key order and tuple/list do not matter
    (Params(0.005, ("conv1",)), {"quantile": 0.005, "layers": ["conv1"]}),
    (PurePosixPath("a/b"), "a/b"),
    (Color.RED, "RED"),
    (np.float64(0.5), 0.5),
    (np.int64(3), 3),
]


@pytest.mark.parametrize("left,right", CASES)
def test_equivalent_values_hash_equal(left, right):
    assert digest(left) == digest(right)


@pytest.mark.parametrize("value", [{"x": 1}, {"x": 1.0000001}, {"x": "1"}, {"x": [1]}, {"y": 1}, {"x": True}])
def test_distinct_values_hash_distinct(value):
    assert digest(value) != digest({"x": 1}) or value == {"x": 1}


def test_int_and_float_are_distinct_but_bool_is_not_int():
    assert digest(1) != digest(1.0)
    assert digest(True) != digest(1)


@pytest.mark.parametrize(
    "value,fragment",
    [
        ({"x": object()}, "$.x"),
        ({"x": {1: 2}}, "dict key 1"),
        ({"x": math.nan}, "non-finite"),
        ({"x": [1, {2, 3}]}, "$.x[1]"),
        ({"x": np.zeros(3)}, "numpy.ndarray"),
        ({"x": lambda: 0}, "function"),
    ],
)
def test_refuses_unhashable_values_with_location(value, fragment):
    with pytest.raises(UnhashableValueError, match=fragment.replace("$", r"\$").replace("[", r"\[")):
        digest(value)


def test_canonical_json_is_compact_and_sorted():
    assert canonical_json({"b": 1, "a": {"d": 2, "c": 3}}) == '{"a":{"c":3,"d":2},"b":1}'


def test_stable_across_processes_and_hash_seeds():
    value = {"stage": "iou", "params": {"layer": "conv3", "q": 0.005, "alphas": [0.0, 1e-3]}, "up": ["k1", "k2"]}
    code = (
        "from repdissect.core import digest;"
        "print(digest({'stage':'iou','params':{'layer':'conv3','q':0.005,'alphas':[0.0,1e-3]},'up':['k1','k2']}))"
    )
    outs = set()
    for seed in ("0", "1", "12345"):
        env = {"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}
        outs.add(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                check=True).stdout.strip())
    assert outs == {digest(value)}
