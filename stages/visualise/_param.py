"""Image parameterisations for feature visualisation: pixels or a 1/f-scaled Fourier spectrum, colour-decorrelated.

Olah et al., "Feature Visualization" (Distill 2017): optimising raw pixels lets high-frequency patterns
dominate; optimising a Fourier spectrum whose coefficients are scaled by 1/frequency equalises the
gradient's spectrum (a preconditioner), and a fixed 3×3 colour-decorrelation matrix does the same across
colour channels. Both map through a sigmoid into [0, 1] pixels, so the optimiser never leaves the image
range. Shapes: a batch of ``B`` images of ``(3, H, W)``; every image's parameters are independent.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["COLOR_CORRELATION_SQRT", "ImageParam"]

#: square root of the ImageNet RGB colour covariance (lucid's ``color_correlation_svd_sqrt``), columns
#: normalised by the largest column norm, so decorrelated unit-variance noise has natural colours
COLOR_CORRELATION_SQRT = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float64)


def _frequency_scale(h: int, w: int, decay_power: float) -> torch.Tensor:
    """``(H, W//2+1)`` scale 1 / max(|f|, 1/max(H, W))^decay_power of an ``rfft2`` spectrum."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    freq = np.sqrt(fx * fx + fy * fy)
    scale = 1.0 / np.maximum(freq, 1.0 / max(h, w)) ** decay_power
    return torch.as_tensor(scale)


class ImageParam:
    """A batch of ``B`` images parameterised by pixels or by a Fourier spectrum, with colour decorrelation.

    Args:
        init: ``(B, 3, H, W)`` float64 standard-normal noise (one independent draw per image).
        kind: ``"fourier"`` (spectrum scaled by 1/f, Olah et al.) or ``"pixel"``.
        decorrelate: map channels through :data:`COLOR_CORRELATION_SQRT` before the sigmoid.
        init_scale: standard deviation of the initial parameters (small: a near-grey start).
        decay_power: exponent of the 1/f scaling (Fourier only).
        dtype: torch dtype of the parameters and images.
        device: where the parameters live.
    """

    def __init__(self, init: np.ndarray, kind: str = "fourier", *, decorrelate: bool = True, init_scale: float = 0.01,
                 decay_power: float = 1.0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        if kind not in ("fourier", "pixel"):
            raise ValueError(f"parameterisation must be 'fourier' or 'pixel'; got {kind!r}")
        b, c, h, w = init.shape
        self.kind, self.size, self.decorrelate, self.dtype = kind, (h, w), bool(decorrelate), dtype
        noise = torch.as_tensor(np.asarray(init, np.float64) * init_scale)
        if kind == "fourier":
            self.scale = _frequency_scale(h, w, decay_power).to(device=device, dtype=dtype)
            # The spectrum of the white noise: the first image is that noise, 1/f-filtered.
            spec = torch.fft.rfft2(noise, norm="ortho")
            self.param = torch.view_as_real(spec).to(device=device, dtype=dtype).contiguous().requires_grad_(True)
        else:
            self.param = noise.to(device=device, dtype=dtype).contiguous().requires_grad_(True)
        corr = COLOR_CORRELATION_SQRT / np.max(np.linalg.norm(COLOR_CORRELATION_SQRT, axis=0))
        self.colour = torch.as_tensor(corr, dtype=dtype, device=device)

    def parameters(self) -> list[torch.Tensor]:
        return [self.param]

    def image(self) -> torch.Tensor:
        """``(B, 3, H, W)`` images in [0, 1]."""
        if self.kind == "fourier":
            spec = torch.view_as_complex(self.param) * self.scale
            x = torch.fft.irfft2(spec, s=self.size, norm="ortho") / 4.0
        else:
            x = self.param
        if self.decorrelate:
            x = torch.einsum("ij,bjhw->bihw", self.colour, x)
        return torch.sigmoid(2.0 * x)
