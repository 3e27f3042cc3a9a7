"""Brightness statistics of images in data units ([-1, 1]); brightness 0 is black, 1 is white."""

from __future__ import annotations

import torch


def brightness(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean brightness in [0, 1]: ``(mean(x) + 1) / 2``, shape (B,)."""
    return (x.flatten(1).to(torch.float64).mean(1) + 1) / 2


def spread_ratio(samples: torch.Tensor, data: torch.Tensor) -> float:
    """Std of per-image mean brightness of ``samples`` over that of ``data``; 1.0 is the data's range."""
    return float(brightness(samples).std() / brightness(data).std())
