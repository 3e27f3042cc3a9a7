"""The one contract every sampler consumes: ``denoiser(x_t, t, alpha_cumprod, **cond) -> x0_hat``.

``x_t`` is in variance-preserving coordinates (``sqrt(ᾱ) x0 + sqrt(1 - ᾱ) eps``), the space networks
see, so that SNR = 0 (σ = ∞ in k-diffusion's coordinates, its issue #64) is an ordinary point.
``t`` is the (possibly fractional) training timestep and ``alpha_cumprod`` its ᾱ, both plain floats
shared by the batch. ``cond`` holds the network's keyword arguments: batch-first tensors, or dicts of them
(SDXL's ``added_cond_kwargs``), passed through as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from .prediction import check_prediction, model_input, to_x0


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: float, alpha_cumprod: float, **cond) -> torch.Tensor: ...


def from_model(model, prediction: str, coordinates: str = "vp") -> Denoiser:
    """Wrap a network called like a diffusers UNet, ``model(x_t, t, **cond)`` with ``t`` a float (B,)
    tensor, whose output is an eps, v, x0 or flow prediction; ``.sample`` outputs are unwrapped. ``coordinates``
    (the schedule's) says what the network sees: ``x_t`` itself, or the flow interpolant for rectified flow."""
    check_prediction(prediction)
    param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    model_dtype = param.dtype if param is not None else None

    def denoise(x: torch.Tensor, t: float, alpha_cumprod: float, **cond) -> torch.Tensor:
        x_in = model_input(coordinates, x, alpha_cumprod)
        x_in = x_in if model_dtype is None else x_in.to(model_dtype)
        t_in = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
        output = model(x_in, t_in, **cond)
        output = getattr(output, "sample", output)
        return to_x0(prediction, output.to(x.dtype), x, alpha_cumprod)

    return denoise


def map_cond(fn: Callable[..., torch.Tensor], *conds: dict) -> dict:
    """``fn`` applied to the matching tensors of conditioning dicts of one shape (nested dicts included), e.g.
    ``map_cond(torch.cat...)`` to batch two; other values are taken from the first dict."""
    keys = [sorted(c) for c in conds]
    if any(k != keys[0] for k in keys):
        raise ValueError(f"conditioning dicts with different keys: {' and '.join(map(str, keys))}")
    out = {}
    for key, value in conds[0].items():
        values = [c[key] for c in conds]
        if isinstance(value, dict):
            out[key] = map_cond(fn, *values)
        elif isinstance(value, torch.Tensor):
            out[key] = fn(*values)
        else:
            out[key] = value
    return out
