"""Image tensors for people: tiling into a grid."""

from __future__ import annotations

import math

import torch


def tile(images: torch.Tensor, columns: int) -> torch.Tensor:
    """``(N, 3, H, W)`` uint8 images as one ``(rows·H, columns·W, 3)`` grid, row by row, black padding."""
    n, c, h, w = images.shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    pad = torch.zeros(rows * columns - n, c, h, w, dtype=images.dtype)
    grid = torch.cat([images, pad]).view(rows, columns, c, h, w)
    return grid.permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, c)
