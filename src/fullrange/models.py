"""Networks: small diffusers UNets built from config (no downloads), and seeded initialisation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers import UNet2DModel

from .toy import LABELS


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Random draws inside the block (network initialisation, which takes no generator) come from ``seed``; the
    global random state outside it is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_unet(
    sample_size: int = 16, channels: int = 3, num_labels: int = len(LABELS), width: int = 32, seed: int = 0
) -> UNet2DModel:
    """A small class-conditional ``UNet2DModel``, initialised from ``seed``; label ``num_labels`` is the null label
    (guidance dropout)."""
    if sample_size < 4 or sample_size % 2 or channels <= 0 or width < 8 or width % 8:
        raise ValueError(
            f"tiny_unet needs an even sample_size >= 4, channels > 0 and a width that is a multiple of 8; "
            f"got {sample_size}, {channels}, {width}"
        )
    with seeded(seed):
        return UNet2DModel(
            sample_size=sample_size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=(width, 2 * width),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            num_class_embeds=num_labels + 1,
            norm_num_groups=8,
            attention_head_dim=8,
        )
