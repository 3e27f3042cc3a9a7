"""The training loss: a recipe (how noise, targets and weights are made), timestep draws, per-sample MSE, SNR
weightings, and the loss of one batch (DDPM Algorithm 1)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from . import noise, prediction
from .denoiser import map_cond
from .prediction import check_prediction
from .sampling import STABLE_DIFFUSION, ZERO_TERMINAL_SNR, SamplingSpec
from .schedules import RectifiedFlow, rectified_flow, shift_time

WEIGHTINGS = ("none", "min_snr")
TIMESTEP_DRAWS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class Recipe:
    """How training noise, targets and loss weights are made (the article's and the paper's fixes), and how the model
    it trains is sampled: ``spec`` holds the schedule, the prediction target and the spacing."""

    name: str
    spec: SamplingSpec = field(default=STABLE_DIFFUSION)
    noise: str = "gaussian"
    offset_strength: float = 0.1
    pyramid_discount: float = 0.8
    input_perturbation: float = 0.0
    weighting: str = "none"
    snr_gamma: float = 5.0
    weight_floor: float = 0.0
    timestep_draw: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self) -> None:
        if self.noise not in noise.NOISES:
            raise ValueError(
                f"recipe {self.name!r}: unknown noise {self.noise!r}; choose one of {', '.join(noise.NOISES)}"
            )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"recipe {self.name!r}: unknown weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}"
            )
        if self.timestep_draw not in TIMESTEP_DRAWS:
            raise ValueError(
                f"recipe {self.name!r}: unknown timestep_draw {self.timestep_draw!r}; "
                f"choose one of {', '.join(TIMESTEP_DRAWS)}"
            )

    def describe(self) -> dict:
        """JSON for files and checkpoints."""
        parts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "spec"}
        return parts | {"spec": self.spec.describe()}


RECIPES = {
    "baseline": Recipe("baseline"),
    "offset": Recipe("offset", noise="offset", offset_strength=0.1),
    "pyramid": Recipe("pyramid", noise="pyramid", pyramid_discount=0.8),
    "ztsnr": Recipe("ztsnr", ZERO_TERMINAL_SNR),
    "flow": Recipe("flow", SamplingSpec(rectified_flow(), "flow"), timestep_draw="logit_normal"),
}
"""Stable Diffusion's recipe (scaled_linear, eps, iid noise, leading steps), the three fixes of the article and the
paper (offset noise, pyramid noise, zero terminal SNR with v-prediction and trailing steps), and rectified flow as
SD3 trains it (flow target, logit-normal(0, 1) times, no shift at the base size, no weighting; Esser et al. 2024)."""


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Training timesteps drawn uniformly from ``0..T-1`` (DDPM Algorithm 1), shape (B,)."""
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device)


def draw_timesteps(recipe: Recipe, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """The recipe's training timesteps, shape (B,), on the CPU. ``u`` in (0, 1) is uniform or logit-normal
    (``sigmoid(N(logit_mean, logit_std²))``, SD3's §3.1); rectified flow trains at continuous ``t = T · shift(u)``
    (its schedule's shift, :func:`fullrange.schedules.shift_time`), a table schedule at ``t = floor(u T)``. Uniform
    draws on a table are :func:`sample_timesteps` (integers)."""
    schedule = recipe.spec.schedule
    T = schedule.num_train_timesteps
    if recipe.timestep_draw == "uniform" and not isinstance(schedule, RectifiedFlow):
        return sample_timesteps(batch_size, T, generator)
    if recipe.timestep_draw == "logit_normal":
        normal = torch.randn(batch_size, generator=generator, dtype=torch.float64)
        u = torch.sigmoid(recipe.logit_mean + recipe.logit_std * normal)
    else:
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    if isinstance(schedule, RectifiedFlow):
        return T * shift_time(u, schedule.shift)
    return (u * T).long().clamp(max=T - 1)


def min_snr_weight(snr: torch.Tensor, prediction: str, gamma: float = 5.0, floor: float = 0.0) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023) for the target actually trained, finite at SNR = 0.

    The weight on the x0-MSE is ``min(SNR, γ)``; divided by the target's own scale it becomes
    ``min(1, γ/SNR)`` for eps (1 at SNR = 0, the limit of ``min(SNR, γ)/SNR``), ``min(SNR, γ)/(SNR + 1)``
    for v, ``min(SNR, γ)`` for x0 and ``min(SNR, γ)/(1 + sqrt(SNR))²`` for the flow velocity (its x0 error is
    ``s/(a + s)`` times u's). The last two are 0 at SNR = 0, which silences exactly the steps that
    set the image mean at zero terminal SNR; ``floor`` is a lower bound on the weight that keeps them.
    """
    check_prediction(prediction)
    snr = snr.to(torch.float64)
    clipped = snr.clamp(max=gamma)
    if prediction == "epsilon":
        weight = (gamma / snr).clamp(max=1.0)  # γ / 0 = inf at SNR = 0 clamps to 1, the limit
    elif prediction == "v_prediction":
        weight = clipped / (snr + 1)
    elif prediction == "flow":
        weight = clipped / (1 + snr.sqrt()) ** 2
    else:
        weight = clipped
    return weight.clamp(min=floor)


def per_sample_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension, in float32, shape (B,)."""
    return (output.float() - target.float()).pow(2).flatten(1).mean(1)


def draw_noise(recipe: Recipe, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """The recipe's training noise (iid, offset or pyramid), drawn on the CPU from ``generator``."""
    if recipe.noise == "offset":
        return noise.offset(shape, recipe.offset_strength, generator)
    if recipe.noise == "pyramid":
        return noise.pyramid(shape, recipe.pyramid_discount, generator=generator)
    return noise.gaussian(shape, generator)


def batch_loss(
    model,
    x0: torch.Tensor,
    cond: dict,
    recipe: Recipe,
    generator: torch.Generator,
    *,
    weight: torch.Tensor | None = None,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Mean over the batch of the (weighted) per-sample loss for one draw of t and noise (DDPM Alg. 1).

    t and noise are drawn for the whole (global) batch ``x0`` on the CPU, then process ``rank`` of ``world``
    takes its contiguous share of everything to ``device``: every process draws the same numbers, as one
    process would. ``weight`` scales each sample's loss (prior preservation).
    """
    schedule, target_kind = recipe.spec.schedule, recipe.spec.prediction
    t = draw_timesteps(recipe, x0.shape[0], generator)
    eps = draw_noise(recipe, tuple(x0.shape), generator)
    eps_in = noise.perturb(eps, recipe.input_perturbation, generator) if recipe.input_perturbation else eps
    device = device if device is not None else x0.device
    share = x0.shape[0] // world
    shard = slice(rank * share, (rank + 1) * share)
    t, x0, eps, eps_in = t[shard], x0[shard].to(device), eps[shard].to(device), eps_in[shard].to(device)
    cond = map_cond(lambda v: v[shard].to(device), cond)
    ac = (schedule.alphas_cumprod[t] if t.dtype == torch.int64 else schedule.alphas_cumprod_at(t)).to(device)
    x_t = prediction.add_noise(x0, eps_in, ac)
    target = prediction.training_target(target_kind, x0, eps, ac)  # the unperturbed eps: perturbation moves only x_t
    t_in = t.to(device) if t.dtype == torch.int64 else t.to(device, torch.float32)
    output = model(prediction.model_input(schedule.coordinates, x_t, ac), t_in, **cond)
    per_sample = per_sample_mse(getattr(output, "sample", output), target)
    if recipe.weighting == "min_snr":
        snr_weight = min_snr_weight(ac / (1 - ac), target_kind, recipe.snr_gamma, recipe.weight_floor)
        per_sample = per_sample * snr_weight.to(device=device, dtype=per_sample.dtype)
    if weight is not None:
        per_sample = per_sample * weight[shard].to(device=device, dtype=per_sample.dtype)
    return per_sample.mean()
