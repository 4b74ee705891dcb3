"""Precision of the opt-in float32 co-moment products against the float64 ones, on ReLU-like layers.

For each fixture (two nets' layers of 256 + 256 channels, streamed in batches of 8192) the statistic is
accumulated with float64 and float32 products from the same float32 (or float16) activations and compared:
the covariance error in units of σᵢσⱼ (max and median over all entries), the mean error in units of σᵢ, and the
relative error of every moment-based metric (linear CKA, mean CCA ρ̄, SVCCA, PWCCA as Morcos et al. define it
and as google/svcca's code computes it). Fixtures:

* ``latent``: shared latent factors plus private noise, ReLU (channel means ≈ 0.7 σ: the zero reference shift);
* ``active``: the same with pre-activation means up to +1.8 σ, so every channel sits up to 2 σ from 0 (the
  largest offsets the zero reference shift accepts: its worst case);
* ``ill``: a 1/k latent spectrum, channel scales over four decades and offsets of up to 30 σ (cond(Σ) ~ 1e10;
  the first batch's mean is the reference shift).

Usage: python benchmarks/bench_moments_precision.py [--samples 100000] [--dtype float32|float16]
"""

from __future__ import annotations

import argparse

import numpy as np
from bench_compare import _accumulate

from repdissect.stages.compare import (
    JointMoments,
    cca_from_covariance,
    linear_cka_from_covariance,
    pwcca_from_covariance,
    pwcca_google_from_moments,
    svcca_from_covariance,
)


def _fixture(kind: str, samples: int, units: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "ill":
        latent = rng.standard_normal((samples, 64)) / np.arange(1, 65)
        noise = 1e-3
    else:
        latent = rng.standard_normal((samples, 32))
        noise = 1.0
    out = []
    for _ in range(2):
        pre = latent @ rng.standard_normal((latent.shape[1], units)) + noise * rng.standard_normal((samples, units))
        pre /= pre.std(axis=0)
        if kind == "active":
            pre += rng.uniform(0.0, 1.8, units)
        x = np.maximum(pre, 0)
        if kind == "ill":
            x = x * 10.0 ** rng.uniform(-2, 2, units) + rng.uniform(0, 30, units) * x.std(axis=0)
        out.append(x.astype(np.float32))
    return out[0], out[1]


def _metrics(m: JointMoments) -> dict[str, float]:
    caa, cbb, cab = m.cov_aa(), m.cov_bb(), m.cov_ab()
    ca = m.ca
    m2 = m.comoment
    google = pwcca_google_from_moments(m.n, m.block_mean("a"), m.block_mean("b"), m2[:ca, :ca], m2[ca:, ca:],
                                       m2[:ca, ca:])
    return {"CKA": linear_cka_from_covariance(caa, cbb, cab), "CCA": cca_from_covariance(caa, cbb, cab).mean,
            "SVCCA": svcca_from_covariance(caa, cbb, cab).mean, "PWCCA": pwcca_from_covariance(caa, cbb, cab).value,
            "PWCCA-google": google.value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--units", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--fixtures", nargs="*", default=["latent", "active", "ill"])
    args = parser.parse_args()
    print(f"{args.samples} samples × {args.units}+{args.units} channels, {args.dtype} activations, batches of "
          f"{args.batch}: float32 products vs float64 products")
    for kind in args.fixtures:
        a, b = (x.astype(args.dtype) for x in _fixture(kind, args.samples, args.units))
        stats = {p: _accumulate(a, b, args.batch, p) for p in ("float64", "float32")}
        exact, fast = stats["float64"], stats["float32"]
        sd = np.sqrt(exact.variance())
        scale = np.outer(sd, sd)
        live = scale > 0
        cov_err = np.abs(fast.covariance() - exact.covariance())[live] / scale[live]
        mean_err = np.abs(fast.mean - exact.mean)[sd > 0] / sd[sd > 0]
        cond = np.linalg.cond(exact.cov_aa())
        ref = "zero" if not np.any(fast._ref) else "first batch's mean"
        print(f"\n  {kind}: cond(Σ_aa) {cond:.1e}, reference shift: {ref}")
        print(f"    covariance error / σᵢσⱼ: max {cov_err.max():.1e}, median {np.median(cov_err):.1e};  "
              f"mean error / σᵢ: max {mean_err.max():.1e}")
        m64, m32 = _metrics(exact), _metrics(fast)
        print("    metrics, relative error: " + ", ".join(
            f"{k} {abs(m32[k] - m64[k]) / abs(m64[k]):.1e}" for k in m64))


if __name__ == "__main__":
    main()
