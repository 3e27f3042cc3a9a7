"""The training loop (nanoGPT's shape: lr → checkpoint → loss → backward → clip → step → EMA → log), on accelerate.

A *recipe* says how noise, targets and weights are made (the seeds' fixes); a *config* says how long and how
fast to train. The model is anything called like a diffusers UNet, ``model(x_t, t, **cond)``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import losses, noise, prediction, schedules
from .checkpoint import load_checkpoint, save_checkpoint

NOISES = ("gaussian", "offset", "pyramid")


@dataclass(frozen=True)
class Recipe:
    """How training noise, targets and loss weights are made, and how its samples are drawn (``spacing``)."""

    name: str
    schedule: str = "scaled_linear"
    zero_terminal_snr: bool = False
    prediction: str = "epsilon"
    noise: str = "gaussian"
    offset_strength: float = 0.1
    pyramid_discount: float = 0.8
    input_perturbation: float = 0.0
    weighting: str = "none"
    snr_gamma: float = 5.0
    weight_floor: float = 0.0
    spacing: str = "leading"

    def build_schedule(self) -> schedules.Schedule:
        return schedules.by_name(self.schedule, zero_terminal_snr=self.zero_terminal_snr)

    def validate(self) -> Recipe:
        if self.noise not in NOISES:
            raise ValueError(f"recipe {self.name!r}: unknown noise {self.noise!r}; choose one of {', '.join(NOISES)}")
        if self.weighting not in losses.WEIGHTINGS:
            raise ValueError(f"recipe {self.name!r}: unknown weighting {self.weighting!r}")
        losses.validate_recipe(self.build_schedule(), self.prediction)
        return self


RECIPES = {
    "baseline": Recipe("baseline"),
    "offset": Recipe("offset", noise="offset", offset_strength=0.1),
    "pyramid": Recipe("pyramid", noise="pyramid", pyramid_discount=0.8),
    "ztsnr": Recipe("ztsnr", zero_terminal_snr=True, prediction="v_prediction", spacing="trailing"),
}
"""Stable Diffusion's recipe (scaled_linear, eps, iid noise, leading steps) and the seeds' three fixes."""


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    checkpoint_every: int = 250
    seed: int = 0
    mixed_precision: str = "no"

    def validate(self) -> TrainConfig:
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.label_dropout < 1 or not 0 <= self.ema_decay < 1 or self.lr <= 0:
            raise ValueError("need 0 <= label_dropout < 1, 0 <= ema_decay < 1 and lr > 0")
        return self


@dataclass
class TrainResult:
    model: torch.nn.Module
    ema_model: torch.nn.Module
    losses: list[float] = field(default_factory=list)
    step: int = 0


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
    schedule: schedules.Schedule,
    generator: torch.Generator,
) -> torch.Tensor:
    """Mean over the batch of the (weighted) per-sample loss for one draw of t and noise (DDPM Alg. 1)."""
    device = x0.device
    t = losses.sample_timesteps(x0.shape[0], schedule.num_train_timesteps, generator)
    ac = schedule.alphas_cumprod[t]
    eps = draw_noise(recipe, tuple(x0.shape), generator)
    eps_in = noise.perturb(eps, recipe.input_perturbation, generator) if recipe.input_perturbation else eps
    eps, eps_in, ac_dev = eps.to(device), eps_in.to(device), ac.to(device)
    x_t = prediction.add_noise(x0, eps_in, ac_dev)
    target = prediction.training_target(recipe.prediction, x0, eps, ac_dev)
    output = model(x_t, t.to(device), **cond)
    per_sample = losses.per_sample_mse(getattr(output, "sample", output), target)
    if recipe.weighting == "min_snr":
        weight = losses.min_snr_weight(schedule.snr[t], recipe.prediction, recipe.snr_gamma, recipe.weight_floor)
        per_sample = per_sample * weight.to(device=device, dtype=per_sample.dtype)
    return per_sample.mean()


def _lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% (nanoGPT)."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    config: TrainConfig,
    out_dir: Path | str,
    *,
    null_label: int,
    resume: bool = True,
    progress: bool = True,
    description: str | None = None,
    on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``(images, labels)`` (labels go to ``class_labels``; ``null_label`` is the dropped one).

    Writes ``out_dir/checkpoint.safetensors`` every ``checkpoint_every`` steps and at the end, atomically, and the
    loss of every step so far to ``out_dir/loss.json``; with
    ``resume`` an existing checkpoint is continued exactly (model, optimizer, EMA, RNG, step, loss log).
    ``on_checkpoint(step, ema_model)`` runs after each checkpoint (validation at intervals); it must not
    touch the training generator.
    """
    recipe.validate()
    config.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: output directory is a file")
    ckpt_path = out_dir / "checkpoint.safetensors"
    schedule = recipe.build_schedule()
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    loss_log: list[float] = []
    start = 0
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        for key, value in (("recipe", asdict(recipe)), ("config", asdict(config))):
            if ckpt.meta.get(key) != value:
                raise ValueError(f"{ckpt_path}: checkpoint was made with another {key}; use a new output directory")
        model.load_state_dict(ckpt.model)
        ema_model.load_state_dict(ckpt.ema)
        optimizer.load_state_dict(ckpt.optimizer)
        generator.set_state(ckpt.rng["generator"])
        loss_log = ckpt.log["loss"].tolist()
        start = ckpt.step
    model, optimizer = accelerator.prepare(model, optimizer)
    ema_model.to(accelerator.device)
    meta = {"recipe": asdict(recipe), "config": asdict(config)}

    def checkpoint(step: int) -> None:
        save_checkpoint(
            ckpt_path,
            step=step,
            model=accelerator.unwrap_model(model).state_dict(),
            ema=ema_model.state_dict(),
            optimizer=optimizer.state_dict(),
            rng={"generator": generator.get_state()},
            log={"loss": torch.tensor(loss_log, dtype=torch.float64)},
            meta=meta,
        )
        (out_dir / "loss.json").write_text(json.dumps(loss_log))
        if on_checkpoint is not None:
            on_checkpoint(step, ema_model.eval())
            ema_model.train()

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ema_params = [p for p in ema_model.parameters()]
    bar = tqdm(total=config.steps, initial=start, desc=description or f"train {recipe.name}", disable=not progress)
    for step in range(start, config.steps):
        # Learning rate for this step.
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        # Checkpoint before the step, so a resumed run replays exactly what follows.
        if step > start and step % config.checkpoint_every == 0:
            checkpoint(step)
        # One batch: images, labels with classifier-free-guidance dropout.
        index = torch.randint(0, images.shape[0], (config.batch_size,), generator=generator)
        drop = torch.rand(config.batch_size, generator=generator) < config.label_dropout
        cond = {"class_labels": torch.where(drop, null_label, labels[index]).to(accelerator.device)}
        x0 = images[index].to(accelerator.device)
        with accelerator.autocast():
            loss = batch_loss(model, x0, cond, recipe, schedule, generator)
        accelerator.backward(loss)
        if config.grad_clip > 0:
            accelerator.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # EMA of the weights (decay warmed up so early averages are not dominated by the random init).
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_params, [p.detach() for p in accelerator.unwrap_model(model).parameters()], 1 - decay)
        loss_log.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss_log[-1]:.4f}")
    bar.close()
    if start < config.steps or not ckpt_path.exists():
        checkpoint(config.steps)
    unwrapped = accelerator.unwrap_model(model)
    return TrainResult(unwrapped, ema_model.eval(), loss_log, config.steps)
