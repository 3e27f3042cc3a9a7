"""The signal leak as a control (Everaert et al., WACV 2024, "Exploiting the Signal-Leak Bias in Diffusion Models").

A schedule without zero terminal SNR leaks ``sqrt(ᾱ) x0`` into the x_t its model was trained on, and the model
reads the image's low frequencies (its mean above all) from it. Starting the sampler at
``x = sqrt(ᾱ_first) L + sqrt(1 - ᾱ_first) noise`` gives an unmodified model the content ``L`` it expects there.

``L``'s low frequencies live in the orthonormal 2-D DCT-II, scaled by ``1 / sqrt(H W)`` so that a coefficient is
the same at every size (the (0, 0) coefficient is the mean); :class:`ToneStats` is the paper's joint Gaussian of
them, fitted to data and drawn per sample. The high-frequency rest stays iid noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BAND = 3
"""DCT frequencies kept per side and channel (3 × 3): the mean and the slowest gradients, as Everaert et al."""


def start(noise: torch.Tensor, leak: torch.Tensor, alpha_cumprod: float) -> torch.Tensor:
    """``sqrt(ᾱ) L + sqrt(1 - ᾱ) noise``: the forward process at ᾱ with ``L`` in place of x0. ``leak`` broadcasts
    against ``noise``: per-channel means (B, C, 1, 1), a low-frequency image or a whole x0."""
    if not math.isfinite(alpha_cumprod) or not 0 <= alpha_cumprod <= 1:
        raise ValueError(f"alpha_cumprod must be in [0, 1], got {alpha_cumprod}")
    try:
        torch.broadcast_shapes(leak.shape, noise.shape)
    except RuntimeError:
        shapes = f"{tuple(leak.shape)} does not broadcast to noise {tuple(noise.shape)}"
        raise ValueError(f"leak of shape {shapes}") from None
    if not bool(torch.isfinite(leak).all()):
        raise ValueError("leak has non-finite values")
    x = math.sqrt(alpha_cumprod) * leak.to(noise) + math.sqrt(1 - alpha_cumprod) * noise
    return x.expand_as(noise) if x.shape != noise.shape else x


RELEASE = 1 / 32
"""The tone of a model that leaks nothing is held in its predictions down to σ = RELEASE·sqrt(C·H·W) (0.87 at
3×16×16, 4 at SD's 4×64×64), where the noise left in an image's lowest frequencies is a thirty-second of the scale
at which its mean is decided. Chosen on trained models (``benchmarks/tone_release.py``): on the reproduction's
class-conditional zero-SNR models "solid black" asked with a white tone moved 7% of the way at a quarter of that
scale, 14–33% at an eighth, 30–66% at a sixteenth and 60–80% here; on the exact mixture it lands within 0.003 of
the request from 0.1 to 0.9 (``benchmarks/leak_calibration.py``). Held only at σ = ∞, a tone survives trailing
steps, whose second step is already low, but not a Karras ladder, whose next steps are still far above it."""


def steer(denoiser, leak: torch.Tensor, k: int = BAND):
    """A denoiser whose x0 predictions carry ``leak``'s lowest ``k × k`` frequencies in place of their own while
    σ >= :data:`RELEASE`·sqrt(C·H·W): the tone of a model that leaks nothing. At zero terminal SNR the first step sees
    pure noise, and the model's x0 prediction there is the same for any noise, the conditional mean (Lin et al.
    2024, §4), so no start can carry a tone. The step from σ = ∞ puts the toned prediction into the next x
    (``x = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε``), and the exact ODE goes on from there; the model's own high frequencies
    are kept. ``leak`` broadcasts against x (per-channel means, a low-frequency image, an x0)."""

    def steered(x: torch.Tensor, t: float, alpha_cumprod: float, **cond) -> torch.Tensor:
        x0 = denoiser(x, t, alpha_cumprod, **cond)
        release = RELEASE**2 * x[0].numel()  # σ² at which the model's own low band takes over
        if alpha_cumprod > 0 and (1 - alpha_cumprod) / alpha_cumprod < release:
            return x0
        target = leak.to(x0).expand_as(x0)
        return x0 - low_band(x0, k) + low_band(target, k)

    return steered


def low_band(x: torch.Tensor, k: int = BAND) -> torch.Tensor:
    """The part of ``x`` (..., H, W) in its lowest ``k × k`` DCT frequencies (a projection: ``low_band`` of it is
    itself)."""
    size = tuple(x.shape[-2:])
    return from_low_frequencies(low_frequencies(x, min(k, *size)), size)


def dct_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """The orthonormal DCT-II of length ``n``: ``M[u, i] = w_u cos(π u (2i + 1) / 2n)``, ``w_0 = sqrt(1/n)``,
    ``w_u = sqrt(2/n)``; ``M @ M.T = I``."""
    u = torch.arange(n, dtype=dtype).unsqueeze(1)
    i = torch.arange(n, dtype=dtype).unsqueeze(0)
    m = torch.cos(math.pi * u * (2 * i + 1) / (2 * n)) * math.sqrt(2 / n)
    m[0] = math.sqrt(1 / n)
    return m


def low_frequencies(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k × k`` lowest DCT coefficients of each channel of ``x`` (..., H, W), divided by ``sqrt(H W)``:
    (..., k, k), size-independent (a constant image's (0, 0) coefficient is its value)."""
    h, w = x.shape[-2:]
    if not 1 <= k <= min(h, w):
        raise ValueError(f"k must be between 1 and {min(h, w)} for a {h}×{w} image, got {k}")
    mh, mw = dct_matrix(h)[:k].to(x), dct_matrix(w)[:k].to(x)
    return mh @ x @ mw.T / math.sqrt(h * w)


def from_low_frequencies(coefficients: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The image (..., H, W) whose DCT is ``coefficients`` (..., k, k) (as :func:`low_frequencies` scales them)
    in its lowest frequencies and zero elsewhere."""
    h, w = size
    k = coefficients.shape[-1]
    if coefficients.shape[-2] != k or k > min(h, w):
        raise ValueError(f"coefficients of shape {tuple(coefficients.shape[-2:])} do not fit a {h}×{w} image")
    mh, mw = dct_matrix(h)[:k].to(coefficients), dct_matrix(w)[:k].to(coefficients)
    return mh.T @ coefficients @ mw * math.sqrt(h * w)


@dataclass(frozen=True)
class ToneStats:
    """A joint Gaussian of the ``k × k`` lowest DCT coefficients of every channel (Everaert et al. §4): ``mean``
    (C·k·k,) and ``covariance`` (C·k·k, C·k·k), flattened channel-major."""

    mean: torch.Tensor
    covariance: torch.Tensor
    channels: int
    k: int

    def __post_init__(self) -> None:
        d = self.channels * self.k**2
        if self.mean.shape != (d,) or self.covariance.shape != (d, d):
            raise ValueError(
                f"tone statistics of {self.channels} channels and k = {self.k} need a mean of ({d},) and a "
                f"covariance of ({d}, {d}); got {tuple(self.mean.shape)} and {tuple(self.covariance.shape)}"
            )
        if not bool(torch.isfinite(self.mean).all() and torch.isfinite(self.covariance).all()):
            raise ValueError("tone statistics have non-finite values")

    @classmethod
    def fit(cls, x0: torch.Tensor, k: int = 3) -> ToneStats:
        """Fit to samples ``x0`` (N, C, H, W): the mean and (maximum-likelihood) covariance of their coefficients."""
        if x0.ndim != 4 or x0.shape[0] < 1:
            raise ValueError(f"need samples of shape (N, C, H, W) with N >= 1, got {tuple(x0.shape)}")
        return cls.from_coefficients(low_frequencies(x0.double(), k))

    @classmethod
    def from_coefficients(cls, coefficients: torch.Tensor) -> ToneStats:
        """Fit to the coefficients (N, C, k, k) of N samples, as :func:`low_frequencies` gives them."""
        n, channels, k, _ = coefficients.shape
        c = coefficients.double().flatten(1)
        centred = c - c.mean(0)
        return cls(c.mean(0), centred.T @ centred / n, channels, k)

    def draw(self, n: int, size: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` leaks (n, C, H, W) in float64: coefficients drawn from the Gaussian, all other frequencies zero."""
        values, vectors = torch.linalg.eigh(self.covariance.double())
        root = vectors * values.clamp(min=0).sqrt()  # root @ root.T = covariance, for any PSD covariance
        z = torch.randn(n, self.mean.numel(), generator=generator, dtype=torch.float64)
        coefficients = (self.mean.double() + z @ root.T).view(n, self.channels, self.k, self.k)
        return from_low_frequencies(coefficients, size)
