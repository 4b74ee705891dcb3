"""Lasso non-convergence: keyed stopping rule, warnings in the console summary and on the report page."""

from __future__ import annotations

import pandas as pd
import pytest

from repdissect.pipeline import ConfigError, load_config, run, status
from repdissect.reports import summary_text, write_report
from repdissect.reports._convergence import lasso_warnings

from helpers import write_tiny_config


def _regression(converged: list[bool], sweeps: list[int]) -> pd.DataFrame:
    n = len(converged)
    return pd.DataFrame({"a": ["cnn@s0"] * n, "b": ["cnn@s1"] * n, "kind": ["seeds"] * n, "layer": ["conv2"] * n,
                         "alpha": [0.01 * (i + 1) for i in range(n)], "direction": ["a_from_b"] * n,
                         "converged": converged, "sweeps": sweeps})


@pytest.mark.parametrize("converged, expected", [
    ([True, True], []),
    ([True, False], ["cnn@s0 vs cnn@s1, layer conv2, a_from_b, α=0.02: stopped after 7 sweeps"]),
    ([False, False], ["cnn@s0 vs cnn@s1, layer conv2, a_from_b, α=0.01: stopped after 7 sweeps",
                      "cnn@s0 vs cnn@s1, layer conv2, a_from_b, α=0.02: stopped after 7 sweeps"]),
])
def test_lasso_warnings_name_each_unconverged_fit(converged, expected):
    assert lasso_warnings(_regression(converged, [7] * len(converged))) == expected


def test_lasso_warnings_of_no_table():
    assert lasso_warnings(pd.DataFrame()) == []


@pytest.mark.parametrize("line, fragment", [
    ("lasso_tol = 0.0", "[compare].lasso_tol = 0.0"),
    ("lasso_tol = 1.5", "[compare].lasso_tol = 1.5"),
    ("lasso_max_sweeps = 0", "[compare].lasso_max_sweeps = 0"),
    ("lasso_max_sweeps = 1.5", "[compare].lasso_max_sweeps = 1.5"),
])
def test_bad_lasso_settings_are_refused(tmp_path, line, fragment):
    path = write_tiny_config(tmp_path)
    path.write_text(path.read_text().replace("[compare]\n", f"[compare]\n{line}\n"))
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_config(path)


def test_stopping_rule_is_keyed_and_non_convergence_is_reported(tmp_path):
    base = write_tiny_config(tmp_path)
    first = run(base)
    assert "did not converge" not in summary_text(first)

    strict = tmp_path / "strict.toml"
    strict.write_text(base.read_text().replace("[compare]\n", "[compare]\nlasso_tol = 1e-14\nlasso_max_sweeps = 1\n"))
    reasons = {s.node_id: s for s in status(strict)}
    assert {s.stage for s in reasons.values() if not s.cached} == {"compare"}
    changed = next(s for s in reasons.values() if s.stage == "compare")
    assert "param lasso_max_sweeps: 2000 → 1" in changed.reason and "param lasso_tol" in changed.reason

    second = run(strict)
    regression = second.tables("compare", "regression")
    unconverged = int((~regression["converged"]).sum())
    assert unconverged > 0 and (regression.loc[~regression["converged"], "sweeps"] == 1).all()
    text = summary_text(second)
    assert f"{unconverged} lasso fit(s) did not converge within [compare].lasso_max_sweeps = 1" in text
    page = write_report(second).read_text(encoding="utf-8")
    assert f"{unconverged} lasso fit(s) did not converge" in page and 'class="warning"' in page
