"""Batch providers and combinators (fullrange.batches)."""

import torch

from fullrange import batches


def test_prior_preservation_interleaves_and_weighs():
    instance = lambda n, g: batches.Batch(torch.zeros(n, 1), {"c": torch.zeros(n)})  # noqa: E731
    prior = lambda n, g: batches.Batch(torch.ones(n, 1), {"c": torch.ones(n)})  # noqa: E731
    batch = batches.with_prior(instance, prior, prior_weight=0.25)(4, None)
    assert batch.x0.flatten().tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert batch.cond["c"].tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert batch.weight.tolist() == [1, 0.25, 1, 0.25, 1, 0.25, 1, 0.25]
