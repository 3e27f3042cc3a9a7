"""Prediction targets: the only place the eps / v / x0 / flow formulas live (Salimans & Ho 2022, §4 and App. D;
rectified flow, Liu et al. 2023).

With ``a = sqrt(ᾱ)``, ``s = sqrt(1 - ᾱ)`` and ``x_t = a x0 + s eps``:
``v = a eps - s x0``, ``x0 = a x_t - s v``, ``x0 = (x_t - s eps) / a``; the flow velocity ``u = eps - x0`` gives
``x_t = (a + s) x0 + s u``, so ``x0 = (x_t - s u) / (a + s)``, finite everywhere. The flow interpolant
``(1 - tau) x0 + tau eps`` is ``x_t / (a + s)`` (:func:`to_flow_input`).
Names match diffusers' ``prediction_type``: ``"epsilon"``, ``"v_prediction"``, ``"sample"``; ``"flow"`` is diffusers'
``"flow_prediction"`` and what its flow-matching schedulers assume.
"""

from __future__ import annotations

import math

import torch

PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    return prediction


def _coefficients(
    alpha_cumprod: torch.Tensor | float, like: torch.Tensor
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """``(a, s)``: Python floats for one ᾱ (cheap in sampler loops); for per-sample ᾱ of shape (B,),
    float64-computed tensors cast to ``like``'s dtype and broadcastable against it."""
    if isinstance(alpha_cumprod, float | int):
        return math.sqrt(alpha_cumprod), math.sqrt(1 - alpha_cumprod)
    ac = torch.as_tensor(alpha_cumprod, dtype=torch.float64, device=like.device)
    ac = ac.reshape(ac.shape + (1,) * (like.ndim - ac.ndim))
    return ac.sqrt().to(like.dtype), (1 - ac).sqrt().to(like.dtype)


def training_target(
    prediction: str, x0: torch.Tensor, eps: torch.Tensor, alpha_cumprod: torch.Tensor | float
) -> torch.Tensor:
    """What the network learns to output: eps, ``v = a eps - s x0``, x0, or the flow velocity ``u = eps - x0``."""
    check_prediction(prediction)
    if prediction == "epsilon":
        return eps
    if prediction == "sample":
        return x0
    if prediction == "flow":
        return eps - x0
    a, s = _coefficients(alpha_cumprod, x0)
    return a * eps - s * x0


def to_x0(
    prediction: str, output: torch.Tensor, x_t: torch.Tensor, alpha_cumprod: torch.Tensor | float
) -> torch.Tensor:
    """x0 from a network output. eps is undefined at ᾱ = 0 (SNR = 0: eps carries no x0) and raises."""
    check_prediction(prediction)
    if prediction == "sample":
        return output
    a, s = _coefficients(alpha_cumprod, x_t)
    if prediction == "v_prediction":
        x0 = a * x_t - s * output
    elif prediction == "flow":
        x0 = (x_t - s * output) / (a + s)  # a + s >= 1: finite at SNR = 0
    else:
        if bool(torch.as_tensor(a == 0).any()):
            raise ValueError(
                "epsilon prediction cannot give x0 at zero SNR (alphas_cumprod = 0): "
                "use v_prediction or sample with zero terminal SNR (Lin et al. §3.2)"
            )
        x0 = (x_t - s * output) / a
    return x0


def from_x0(prediction: str, x0: torch.Tensor, x_t: torch.Tensor, alpha_cumprod: torch.Tensor | float) -> torch.Tensor:
    """The network output that gives ``x0`` at ``x_t``: the inverse of :func:`to_x0`."""
    check_prediction(prediction)
    if prediction == "sample":
        return x0
    if prediction == "flow":
        return to_eps(x0, x_t, alpha_cumprod) - x0
    return (to_v if prediction == "v_prediction" else to_eps)(x0, x_t, alpha_cumprod)


def to_eps(x0: torch.Tensor, x_t: torch.Tensor, alpha_cumprod: torch.Tensor | float) -> torch.Tensor:
    """``eps = (x_t - a x0) / s``: finite at ᾱ = 0 (s = 1); undefined only at ᾱ = 1."""
    a, s = _coefficients(alpha_cumprod, x_t)
    return (x_t - a * x0) / s


def to_v(x0: torch.Tensor, x_t: torch.Tensor, alpha_cumprod: torch.Tensor | float) -> torch.Tensor:
    """``v = (a x_t - x0) / s`` (from ``v = a eps - s x0``); finite at ᾱ = 0."""
    a, s = _coefficients(alpha_cumprod, x_t)
    return (a * x_t - x0) / s


def from_v(v: torch.Tensor, x_t: torch.Tensor, alpha_cumprod: torch.Tensor | float) -> torch.Tensor:
    """``x0 = a x_t - s v``."""
    return to_x0("v_prediction", v, x_t, alpha_cumprod)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_cumprod: torch.Tensor | float) -> torch.Tensor:
    """The forward process ``x_t = a x0 + s eps`` (DDPM eq. 4)."""
    a, s = _coefficients(alpha_cumprod, x0)
    return a * x0 + s * eps


def to_flow_input(x_t: torch.Tensor, alpha_cumprod: torch.Tensor | float) -> torch.Tensor:
    """The flow interpolant ``(1 - tau) x0 + tau eps = x_t / (a + s)`` of a variance-preserving ``x_t``."""
    a, s = _coefficients(alpha_cumprod, x_t)
    return x_t / (a + s)


def from_flow_input(x: torch.Tensor, alpha_cumprod: torch.Tensor | float) -> torch.Tensor:
    """The variance-preserving ``x_t = (a + s) x`` of a flow interpolant ``x``: the inverse of :func:`to_flow_input`."""
    a, s = _coefficients(alpha_cumprod, x)
    return x * (a + s)


def model_input(coordinates: str, x_t: torch.Tensor, alpha_cumprod: torch.Tensor | float) -> torch.Tensor:
    """What a network trained in ``coordinates`` (a schedule's ``"vp"`` or ``"flow"``) sees at ``x_t``."""
    return to_flow_input(x_t, alpha_cumprod) if coordinates == "flow" else x_t
