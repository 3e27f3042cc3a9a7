"""The training loop (nanoGPT's shape: lr → checkpoint → loss → backward → clip → step → EMA → log), on accelerate.

A *recipe* says how noise, targets and weights are made (the seeds' fixes); a *config* says how long and how
fast to train. The model is anything called like a diffusers UNet, ``model(x_t, t, **cond)``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import losses, noise, prediction, schedules
from .checkpoint import load_checkpoint, save_checkpoint


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
        if self.noise not in noise.NOISES:
            raise ValueError(
                f"recipe {self.name!r}: unknown noise {self.noise!r}; choose one of {', '.join(noise.NOISES)}"
            )
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
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 50
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    seed: int = 0
    mixed_precision: str = "no"

    def validate(self) -> TrainConfig:
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1 or self.lr <= 0:
            raise ValueError(f"need 0 <= ema_decay < 1 and lr > 0, got {self.ema_decay} and {self.lr}")
        return self


@dataclass
class TrainResult:
    model: torch.nn.Module
    ema: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    step: int = 0

    def ema_model(self) -> torch.nn.Module:
        """A copy of the model carrying the EMA of its trained weights."""
        return with_weights(self.model, self.ema)


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
    t = losses.sample_timesteps(x0.shape[0], schedule.num_train_timesteps, generator)
    eps = draw_noise(recipe, tuple(x0.shape), generator)
    eps_in = noise.perturb(eps, recipe.input_perturbation, generator) if recipe.input_perturbation else eps
    device = device if device is not None else x0.device
    share = x0.shape[0] // world
    shard = slice(rank * share, (rank + 1) * share)
    t, x0, eps, eps_in = t[shard], x0[shard].to(device), eps[shard].to(device), eps_in[shard].to(device)
    cond = {k: v[shard].to(device) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
    ac = schedule.alphas_cumprod[t]
    ac_dev = ac.to(device)
    x_t = prediction.add_noise(x0, eps_in, ac_dev)
    target = prediction.training_target(recipe.prediction, x0, eps, ac_dev)
    output = model(x_t, t.to(device), **cond)
    per_sample = losses.per_sample_mse(getattr(output, "sample", output), target)
    if recipe.weighting == "min_snr":
        snr_weight = losses.min_snr_weight(schedule.snr[t], recipe.prediction, recipe.snr_gamma, recipe.weight_floor)
        per_sample = per_sample * snr_weight.to(device=device, dtype=per_sample.dtype)
    if weight is not None:
        per_sample = per_sample * weight[shard].to(device=device, dtype=per_sample.dtype)
    return per_sample.mean()


def _lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% (nanoGPT)."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint of the step reached was written first."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"interrupted at step {step}; checkpoint written to {path}; run again to resume")
        self.step, self.path = step, path


@contextlib.contextmanager
def _stop_requests():
    """Turn SIGINT / SIGTERM into a flag the loop checks between steps (main thread only)."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda number, frame: requested.append(number))
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class Batch:
    """Clean samples, the model's keyword conditioning (batch-first tensors), optional per-sample loss weights."""

    x0: torch.Tensor
    cond: dict
    weight: torch.Tensor | None = None


Batches = Callable[[int, torch.Generator], Batch]
"""``batches(batch_size, generator) -> Batch``: draws one batch (and its conditioning dropout) on the CPU."""


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

    def draw(batch_size: int, generator: torch.Generator) -> Batch:
        a, b = instance(batch_size, generator), prior(batch_size, generator)
        mix = lambda u, v: torch.stack([u, v], dim=1).flatten(0, 1)  # noqa: E731
        weight_a = a.weight if a.weight is not None else torch.ones(batch_size)
        weight_b = (b.weight if b.weight is not None else torch.ones(batch_size)) * prior_weight
        if set(a.cond) != set(b.cond):
            raise ValueError("instance and class batches need the same conditioning keys")
        return Batch(mix(a.x0, b.x0), {k: mix(a.cond[k], b.cond[k]) for k in a.cond}, mix(weight_a, weight_b))

    return draw


def labelled_batches(images: torch.Tensor, labels: torch.Tensor, null_label: int, dropout: float = 0.1) -> Batches:
    """Batches of ``images`` with ``class_labels``, each replaced by ``null_label`` with probability ``dropout``
    (classifier-free guidance training)."""

    def draw(batch_size: int, generator: torch.Generator) -> Batch:
        index = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        drop = torch.rand(batch_size, generator=generator) < dropout
        return Batch(images[index], {"class_labels": torch.where(drop, null_label, labels[index])})

    return draw


def with_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` (in eval mode, no grad) with some of its parameters replaced, e.g. the EMA ones."""
    copy_ = copy.deepcopy(model).requires_grad_(False).eval()
    missing = set(weights) - set(dict(copy_.named_parameters()))
    if missing:
        raise ValueError(f"weights for unknown parameters: {sorted(missing)[:3]}")
    copy_.load_state_dict(weights, strict=False)
    return copy_


def train(
    model: torch.nn.Module,
    batches: Batches,
    recipe: Recipe,
    config: TrainConfig,
    out_dir: Path | str,
    *,
    resume: bool = True,
    progress: bool = True,
    description: str | None = None,
    on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Train the parameters of ``model`` that require grad (all, or an adapter's) on ``batches``.

    Writes ``out_dir/checkpoint.safetensors`` (trainable weights, their EMA, optimizer, RNG, step, loss log)
    every ``checkpoint_every`` steps and at the end, atomically, and the loss of every step so far to
    ``out_dir/loss.json``; with ``resume`` an existing checkpoint is continued exactly.
    ``on_checkpoint(step, ema_model)`` runs after each checkpoint (validation at intervals); it must not
    touch the training generator. SIGINT / SIGTERM stop the run between steps with a checkpoint and raise
    :class:`TrainingInterrupted`.
    """
    recipe.validate()
    config.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: output directory is a file")
    ckpt_path = out_dir / "checkpoint.safetensors"
    for stale in out_dir.glob(f".{ckpt_path.name}.*.tmp"):  # left by a process killed while writing
        stale.unlink()
    schedule = recipe.build_schedule()
    try:
        accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    except ValueError as err:
        if "already been initialized" not in str(err):
            raise
        raise ValueError(
            f"mixed_precision={config.mixed_precision!r}: accelerate keeps one precision per process and this "
            "process already trained with another; train in a new process"
        ) from None
    generator = torch.Generator().manual_seed(config.seed)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("the model has no trainable parameter")
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=config.lr, weight_decay=0.0)
    ema = {name: p.detach().clone() for name, p in trainable.items()}
    loss_log: list[float] = []
    start = 0
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        for key, value in (("recipe", asdict(recipe)), ("config", asdict(config))):
            if ckpt.meta.get(key) != value:
                raise ValueError(f"{ckpt_path}: checkpoint was made with another {key}; use a new output directory")
        if set(ckpt.model) != set(trainable):
            raise ValueError(f"{ckpt_path}: checkpoint holds other trainable parameters than this model")
        model.load_state_dict(ckpt.model, strict=False)
        ema = {name: ckpt.ema[name].to(p.dtype) for name, p in trainable.items()}
        optimizer.load_state_dict(ckpt.optimizer)
        generator.set_state(ckpt.rng["generator"])
        loss_log = ckpt.log["loss"].tolist()
        start = ckpt.step
    model, optimizer = accelerator.prepare(model, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    ema = {name: value.to(accelerator.device) for name, value in ema.items()}
    meta = {"recipe": asdict(recipe), "config": asdict(config)}

    def checkpoint(step: int) -> None:
        # Every process holds the same state (same draws, averaged gradients); the main one writes it.
        if accelerator.is_main_process:
            save_checkpoint(
                ckpt_path,
                step=step,
                model={name: p for name, p in trainable.items()},
                ema=ema,
                optimizer=optimizer.state_dict(),
                rng={"generator": generator.get_state()},
                log={"loss": torch.tensor(loss_log, dtype=torch.float64)},
                meta=meta,
            )
            (out_dir / "loss.json").write_text(json.dumps(loss_log))
            if on_checkpoint is not None:
                on_checkpoint(step, with_weights(accelerator.unwrap_model(model), ema))
        accelerator.wait_for_everyone()

    model.train()
    params, ema_params = list(trainable.values()), list(ema.values())
    bar = tqdm(
        total=config.steps,
        initial=start,
        desc=description or f"train {recipe.name}",
        disable=not progress or not accelerator.is_local_main_process,
    )
    with _stop_requests() as stop:
        for step in range(start, config.steps):
            # A stop request (to any process) ends the run here, between steps, with a checkpoint.
            stopping = bool(stop)
            if world > 1:
                stopping = bool(accelerator.reduce(torch.tensor(float(stopping), device=accelerator.device)))
            if stopping:
                bar.close()
                checkpoint(step)
                raise TrainingInterrupted(step, ckpt_path)
            # Learning rate for this step.
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, config)
            # Checkpoint before the step, so a resumed run replays exactly what follows.
            if step > start and step % config.checkpoint_every == 0:
                checkpoint(step)
            # grad_accum global batches (batch_size per process), drawn on the CPU from the run's generator
            # in every process alike; each process trains on its shard and DDP averages the gradients.
            loss = 0.0
            for micro_step in range(config.grad_accum):
                batch = batches(config.batch_size * world, generator)
                sync = micro_step == config.grad_accum - 1
                with accelerator.autocast(), contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    micro = batch_loss(
                        model,
                        batch.x0,
                        batch.cond,
                        recipe,
                        schedule,
                        generator,
                        weight=batch.weight,
                        rank=rank,
                        world=world,
                        device=accelerator.device,
                    )
                    accelerator.backward(micro / config.grad_accum)
                loss += accelerator.reduce(micro.detach(), "mean") / config.grad_accum
            if config.grad_clip > 0:
                accelerator.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # EMA of the weights (decay warmed up so early averages are not dominated by the random init).
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
            loss_log.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss_log[-1]:.4f}")
    bar.close()
    if start < config.steps or not ckpt_path.exists():
        checkpoint(config.steps)
    return TrainResult(accelerator.unwrap_model(model), ema, loss_log, config.steps)
