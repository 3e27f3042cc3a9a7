"""Batch providers and their combinators: what the training loop draws its batches from.

A provider is ``batches(batch_size, generator) -> Batch``; it draws on the CPU, from ``generator`` only, so that
every process of a distributed run draws the same global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .denoiser import map_cond


@dataclass
class Batch:
    """Clean samples, the model's keyword conditioning (batch-first tensors, or dicts of them), optional
    per-sample loss weights."""

    x0: torch.Tensor
    cond: dict
    weight: torch.Tensor | None = None


Batches = Callable[[int, torch.Generator], Batch]


def labelled(images: torch.Tensor, labels: torch.Tensor, null_label: int, dropout: float = 0.1) -> Batches:
    """Batches of ``images`` with ``class_labels``, each replaced by ``null_label`` with probability ``dropout``
    (classifier-free guidance training)."""

    def draw(batch_size: int, generator: torch.Generator) -> Batch:
        index = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        drop = torch.rand(batch_size, generator=generator) < dropout
        return Batch(images[index], {"class_labels": torch.where(drop, null_label, labels[index])})

    return draw


def one_of(sources: list[tuple[Batches, float]]) -> Batches:
    """Each batch comes whole from one source, chosen with probability proportional to its weight (buckets)."""
    weights = torch.tensor([float(w) for _, w in sources])

    def draw(batch_size: int, generator: torch.Generator) -> Batch:
        choice = int(torch.multinomial(weights, 1, generator=generator))
        return sources[choice][0](batch_size, generator)

    return draw


def with_prior(instance: Batches, prior: Batches, prior_weight: float = 1.0) -> Batches:
    """Dreambooth's prior preservation (Ruiz et al. 2023): each batch pairs instance samples with as many
    class samples, interleaved so every process's share holds both; class samples weigh ``prior_weight``."""

    def interleave(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.stack([u, v], dim=1).flatten(0, 1)

    def draw(batch_size: int, generator: torch.Generator) -> Batch:
        a, b = instance(batch_size, generator), prior(batch_size, generator)
        weight_a = a.weight if a.weight is not None else torch.ones(batch_size)
        weight_b = (b.weight if b.weight is not None else torch.ones(batch_size)) * prior_weight
        return Batch(interleave(a.x0, b.x0), map_cond(interleave, a.cond, b.cond), interleave(weight_a, weight_b))

    return draw
