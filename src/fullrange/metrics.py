"""Brightness statistics of images in data units ([-1, 1]); brightness 0 is black, 1 is white."""

from __future__ import annotations

import torch


def brightness(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean brightness in [0, 1]: ``(mean(x) + 1) / 2``, shape (B,)."""
    return (x.flatten(1).to(torch.float64).mean(1) + 1) / 2


def spread_ratio(samples: torch.Tensor, data: torch.Tensor) -> float:
    """Std of per-image mean brightness of ``samples`` over that of ``data``; 1.0 is the data's range."""
    return float(brightness(samples).std() / brightness(data).std())


def mean_leak(snr: torch.Tensor | float, num_values: int) -> torch.Tensor:
    """How far a unit shift of the image mean moves ``x_t``'s mean, in std of the noise's own mean.

    The signal moves the mean by ``sqrt(ᾱ)``; the mean of N iid noise values has std ``sqrt(1 - ᾱ)/sqrt(N)``
    (Guttenberg 2023's 1/N argument), so the leak is ``sqrt(SNR · N)``; 0 at zero terminal SNR.
    """
    return (torch.as_tensor(snr, dtype=torch.float64) * num_values).sqrt()


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> float:
    """W1 distance between two 1-D empirical distributions (mean gap between matched quantiles)."""
    q = torch.linspace(0, 1, 201, dtype=torch.float64)
    return float((a.to(torch.float64).quantile(q) - b.to(torch.float64).quantile(q)).abs().mean())


def saturation(x: torch.Tensor, threshold: float = 0.98) -> float:
    """Fraction of values at or beyond ``±threshold`` in data units (clipped highlights and shadows)."""
    return float((x.abs() >= threshold).to(torch.float64).mean())


CAST_NAMES = (("red", "cyan"), ("green", "magenta"), ("blue", "yellow"))


def colour_cast(x: torch.Tensor) -> dict:
    """How coloured the images are as a whole: per image, the chroma of its mean colour, ``d = c - mean(c)`` with
    ``c`` the RGB channel means in [0, 1] (0 for a grey image; a pure primary gives 0.82). Returns the mean of
    ``|d|`` over images and, for images with ``|d| > 0.05``, how many lean to each hue: the channel of the largest
    ``|d_k|`` and its sign (+R red, -R cyan, +G green, -G magenta, +B blue, -B yellow)."""
    c = (x[:, :3].flatten(2).to(torch.float64).mean(2) + 1) / 2
    d = c - c.mean(1, keepdim=True)
    chroma = d.norm(dim=1)
    leans: dict[str, int] = {}
    for row, norm in zip(d, chroma, strict=True):
        if norm > 0.05:
            k = int(row.abs().argmax())
            name = CAST_NAMES[k][0 if row[k] > 0 else 1]
            leans[name] = leans.get(name, 0) + 1
    return {"chroma": float(chroma.mean()), "leans": dict(sorted(leans.items(), key=lambda kv: -kv[1]))}
