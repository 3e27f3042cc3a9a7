"""Diffusion training losses: timestep draws, per-sample MSE, SNR weightings, recipe validation."""

from __future__ import annotations

import warnings

import torch

from .prediction import check_prediction
from .schedules import Schedule

WEIGHTINGS = ("none", "min_snr")


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Training timesteps drawn uniformly from ``0..T-1`` (DDPM Algorithm 1), shape (B,)."""
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device)


def min_snr_weight(snr: torch.Tensor, prediction: str, gamma: float = 5.0, floor: float = 0.0) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023) for the target actually trained, finite at SNR = 0.

    The weight on the x0-MSE is ``min(SNR, γ)``; divided by the target's own scale it becomes
    ``min(1, γ/SNR)`` for eps (1 at SNR = 0, the limit of ``min(SNR, γ)/SNR``), ``min(SNR, γ)/(SNR + 1)``
    for v and ``min(SNR, γ)`` for x0. The last two are 0 at SNR = 0, which silences exactly the steps that
    set the image mean at zero terminal SNR; ``floor`` is a lower bound on the weight that keeps them.
    """
    check_prediction(prediction)
    snr = snr.to(torch.float64)
    clipped = snr.clamp(max=gamma)
    if prediction == "epsilon":
        weight = (gamma / snr).clamp(max=1.0)
    elif prediction == "v_prediction":
        weight = clipped / (snr + 1)
    else:
        weight = clipped
    return weight.clamp(min=floor)


def per_sample_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension, in float32, shape (B,)."""
    return (output.float() - target.float()).pow(2).flatten(1).mean(1)


def validate_recipe(schedule: Schedule, prediction: str, spacing: str | None = None, clip_x0: bool = False) -> None:
    """Refuse combinations that silently break (Lin et al. §3.2-3.3); warn for the doubtful ones."""
    check_prediction(prediction)
    if schedule.zero_terminal_snr:
        if prediction == "epsilon":
            raise ValueError(
                "zero terminal SNR with epsilon prediction: at SNR = 0 eps says nothing about x0; "
                "use v_prediction (Lin et al. §3.2)"
            )
        if spacing == "leading":
            warnings.warn(
                "zero terminal SNR with leading spacing never visits t = T-1, where the model learnt pure "
                "noise; use trailing or linspace (Lin et al. §3.3)",
                stacklevel=2,
            )
        if clip_x0:
            warnings.warn(
                "x0 clipping at zero terminal SNR clips the first prediction (the data mean) and biases "
                "brightness; leave it off",
                stacklevel=2,
            )
