"""``[compare].moments_precision`` is keyed on exactly the moment statistics, and a float32-product run gives
the comparison metrics of a float64 run to float32 accuracy."""

from __future__ import annotations

import numpy as np
from pandas.api.types import is_float_dtype

from repdissect.pipeline import run, status

from helpers import write_tiny_config


def test_moments_precision_is_keyed_and_float32_products_match_float64(tmp_path):
    base = write_tiny_config(tmp_path)
    first = run(base)
    fast = tmp_path / "float32.toml"
    fast.write_text(base.read_text().replace("[compare]\n", '[compare]\nmoments_precision = "float32"\n'))
    stale = [s for s in status(fast) if not s.cached]
    assert {s.stage for s in stale} == {"moments", "compare", "cka"}
    assert all('param precision: "float64" → "float32"' in s.reason for s in stale if s.stage != "compare")
    second = run(fast)
    for table in ("metrics", "svcca"):
        x, y = first.tables("compare", table), second.tables("compare", table)
        assert list(x.columns) == list(y.columns) and len(x) == len(y) > 0
        for column in x.columns:
            if is_float_dtype(x[column]):
                np.testing.assert_allclose(y[column].to_numpy(), x[column].to_numpy(), rtol=1e-4, atol=1e-5,
                                           err_msg=f"{table}.{column}")
    cka_x, cka_y = first.tables("cka", "cka"), second.tables("cka", "cka")
    np.testing.assert_allclose(cka_y["linear_cka"].to_numpy(), cka_x["linear_cka"].to_numpy(), rtol=1e-4)
