"""The training loop (nanoGPT's shape: lr → checkpoint → accumulate → clip → step → EMA → log), on accelerate.

A *recipe* (:mod:`fullrange.losses`) says how noise, targets and weights are made; a :class:`TrainConfig` says how
long and how fast to train. The model is anything called like a diffusers UNet, ``model(x_t, t, **cond)``; only
its parameters that require grad are trained, and only they (their optimizer state and, if asked for, their EMA)
are held beside the model and checkpointed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from tqdm.auto import tqdm

from .batches import Batches
from .checkpoint import Checkpoint, save_checkpoint
from .config import MAX_SEED, ConfigError, check_choice, check_finite, check_range, setting
from .files import write_bytes
from .losses import Recipe, batch_loss

MIXED_PRECISIONS = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adafactor", "adamw8bit")
LR_SCHEDULES = ("constant", "linear", "cosine")
TRACKERS = ("none", "tensorboard")


@dataclass(frozen=True)
class TrainConfig:
    """The ``[train]`` table: how long and how fast to train. ``optimizer``: AdamW, Adafactor (transformers') or
    8-bit AdamW (bitsandbytes', where it runs on the device). ``lr_schedule`` after a linear warm-up of ``warmup``
    steps (default 10% of the steps, at most 100): see :func:`lr_at`. ``ema_decay = 0`` keeps no EMA at all.
    ``report_to``: ``"tensorboard"`` logs loss, learning rate and validation images through accelerate's
    trackers."""

    steps: int = setting(1000, "Training steps.")
    batch_size: int = setting(1, "Batch size (per process).")
    grad_accum: int = setting(1, "Batches accumulated per optimizer step.")
    lr: float = setting(1e-4, "Peak learning rate.", shown="1e-4")
    warmup: int | None = setting(None, "Linear warm-up steps.", shown="10% of `train.steps`, at most 100")
    grad_clip: float = setting(1.0, "Clip the gradients' norm to this (0: no clipping).")
    ema_decay: float = setting(0.0, "EMA decay of the trained weights.", shown="0, off: no copy is kept")
    checkpoint_every: int = setting(250, "Steps between checkpoints.")
    gradient_checkpointing: bool = setting(False, "Recompute activations in backward (less memory, slower).")
    mixed_precision: str = setting("no", "no, fp16 or bf16 (accelerate's autocast).")
    seed: int = setting(0, "Seed of every random draw.")
    optimizer: str = setting("adamw", "adamw, adafactor or adamw8bit (bitsandbytes, where it runs on the device).")
    lr_schedule: str = setting("cosine", "constant, linear or cosine decay after the warm-up.")
    report_to: str = setting(
        "none", "none or tensorboard: loss, learning rate and validation images in OUT/train/logs."
    )

    def __post_init__(self) -> None:
        check_finite(self)
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every"):
            check_range(name, getattr(self, name), 0, open_low=True)
        check_range("lr", self.lr, 0, open_low=True)
        check_range("grad_clip", self.grad_clip, 0)
        check_range("seed", self.seed, 0)
        check_range("seed", self.seed, None, MAX_SEED)
        if self.warmup is not None:
            check_range("warmup", self.warmup, 0)
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must lie in [0, 1), got {self.ema_decay}")
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("report_to", self.report_to, TRACKERS)
        # Packages the choices need, checked before anything is loaded (whether 8-bit AdamW runs on the device is
        # tried when training starts).
        needs = {"report_to": ("tensorboard", "tensorboard"), "optimizer": ("adamw8bit", "bitsandbytes")}
        for name, (value, package) in needs.items():
            if getattr(self, name) == value and importlib.util.find_spec(package) is None:
                raise ConfigError(name, f"{value} needs the {package} package (pip install {package})")

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else min(100, max(1, self.steps // 10))


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of ``step`` (0-based): a linear warm-up to ``lr`` over ``warmup`` steps (step s trains at
    ``lr·(s+1)/warmup``, never at 0), then ``constant``, or a ``linear`` or half-``cosine`` decay to 0 at ``steps``,
    as diffusers' ``get_scheduler`` defines them after the warm-up."""
    warmup = config.warmup_steps
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, config.steps - warmup))
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule == "linear":
        return config.lr * (1 - progress)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(
    params: list[torch.nn.Parameter], config: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over ``params`` (no weight decay: adapters and fine-tunes do not need it).
    Adafactor takes the given learning rate (no relative step or parameter scaling, as kohya sets it). 8-bit AdamW
    is first tried on one tensor on ``device``: where bitsandbytes is missing or cannot run there, it is refused
    with the reason, before training starts."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=config.lr, scale_parameter=False, relative_step=False, warmup_init=False)
    import bitsandbytes

    try:  # big enough for 8-bit state (bitsandbytes keeps tensors under 4096 values in 32 bits)
        probe = torch.zeros(4096, device=device, requires_grad=True)
        probe.grad = torch.ones_like(probe)
        bitsandbytes.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as err:  # bitsandbytes raises many kinds where its kernels are missing
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(
            "optimizer", f"adamw8bit does not run on {device.type} here ({detail}); use adamw or adafactor"
        ) from None
    return bitsandbytes.optim.AdamW8bit(params, lr=config.lr, weight_decay=0.0)


@dataclass
class TrainResult:
    """The trained model (its own weights, not the EMA's), the EMA of its trained parameters if kept, the loss
    of every step."""

    model: torch.nn.Module
    ema: dict[str, torch.Tensor] | None
    losses: list[float] = field(default_factory=list)

    def apply_ema(self) -> torch.nn.Module:
        """Put the EMA weights into the model, in place (no copy); returns the model."""
        if self.ema is None:
            raise ValueError("this run kept no EMA (ema_decay = 0)")
        trained = {name: p for name, p in self.model.named_parameters() if name in self.ema}
        swap(trained, self.ema)
        return self.model


def swap(params: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    """Exchange the data of ``params`` and ``other`` (same names, shapes, devices) in place: no copy is made, and
    a second call undoes the first."""
    with torch.no_grad():
        for name, p in params.items():
            p.data, other[name].data = other[name].data, p.data


class TrainingDiverged(ValueError):
    """The loss became inf or nan; training stopped before the step that would have used it."""


class TrainingInterrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived; a checkpoint of the step reached was written first."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"interrupted at step {step}; checkpoint written to {path}; run again to resume")
        self.step, self.path = step, path


@contextlib.contextmanager
def _stop_requests():
    """Turn SIGINT, SIGTERM and SIGHUP (a closed terminal or SSH session) into a flag the loop checks between steps
    (main thread only)."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for sig in previous:
        signal.signal(sig, lambda number, frame: requested.append(number))
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def process_state() -> PartialState:
    """accelerate's view of this process (its device, rank, world), set up as the training loop sets it up: on
    the CPU where there is no CUDA device, so that CPU processes started by a launcher form one group. Ask it before
    the loop starts and it is the same state the loop then uses."""
    return PartialState(cpu=not torch.cuda.is_available())


def _accelerator(config: TrainConfig, log_dir: Path) -> Accelerator:
    tracking = {} if config.report_to == "none" else {"log_with": config.report_to, "project_dir": log_dir}
    try:
        return Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available(), **tracking)
    except ValueError as err:
        if "already been initialized" not in str(err):
            raise
        raise ConfigError(
            "mixed_precision",
            f"{config.mixed_precision!r}: accelerate keeps one precision per process and this process already "
            "trained with another; train in a new process",
        ) from None


@dataclass
class _State:
    """What a checkpoint holds besides the model: the trained parameters, their EMA, optimizer, generator, log."""

    trainable: dict[str, torch.nn.Parameter]
    ema: dict[str, torch.Tensor] | None
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    losses: list[float]
    meta: dict

    def save(self, path: Path, step: int, rng: torch.Tensor | None = None) -> None:
        """A checkpoint of ``step``; ``rng``: the generator's state to record (default: its state now)."""
        if not all(bool(torch.isfinite(p).all()) for p in self.trainable.values()):
            raise TrainingDiverged(f"the weights are not finite at step {step}: no checkpoint of them is written")
        save_checkpoint(
            path,
            step=step,
            model=self.trainable,
            ema=self.ema,
            optimizer=self.optimizer.state_dict(),
            rng={"generator": self.generator.get_state() if rng is None else rng},
            log={"loss": torch.tensor(self.losses, dtype=torch.float64)},
            meta=self.meta,
        )
        write_bytes(path.parent / "loss.json", json.dumps(self.losses).encode())
        (path.parent / DIVERGED).unlink(missing_ok=True)  # this run went on from where one diverged

    def resume(self, path: Path, steps: int) -> int:
        """Load the checkpoint at ``path`` into the state, in place (after :func:`check_resume`); returns its step."""
        ckpt = check_resume(path, self.meta, steps)
        ckpt.load_into("model", self.trainable)
        if self.ema is not None:
            ckpt.load_into("ema", self.ema)
        self.optimizer.load_state_dict(ckpt.optimizer_state())
        self.generator.set_state(ckpt.group("rng")["generator"])
        self.losses = ckpt.group("log")["loss"].tolist()
        return ckpt.step


RESUMABLE_CHANGES = ("train.steps", "train.checkpoint_every")
"""What a resumed run may change: train longer (the learning-rate schedule stretches to the new end), or checkpoint at
other intervals (and name the same model and data by another path: their fingerprints decide)."""
DIVERGED = "diverged.json"
"""Left beside the checkpoint by a run whose loss stopped being finite: resuming from that checkpoint may then change
the learning rate too (until the resumed run writes its first checkpoint)."""


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def check_resume(path: Path, meta: dict, steps: int) -> Checkpoint:
    """The checkpoint at ``path``, if a run described by ``meta`` training to ``steps`` may continue it: the same
    recipe, config (but for :data:`RESUMABLE_CHANGES`) and whatever identity the caller put in ``meta`` (base
    model, data, adapter). Otherwise a ``ValueError`` naming every key that differs and how to proceed."""
    ckpt = Checkpoint(path)
    saved, now = _flat(ckpt.meta), _flat(meta)
    may_change = RESUMABLE_CHANGES + (("train.lr",) if (Path(path).parent / DIVERGED).exists() else ())
    # A path may change where what it names did not (a resume from another working directory, a moved data set).
    may_change += tuple(
        f"{n}.path" for n in ("model", "data") if saved.get(f"{n}.fingerprint") == now.get(f"{n}.fingerprint")
    )
    differ = [
        f"{key} ({saved.get(key, 'absent')!r} in the checkpoint, {now.get(key, 'absent')!r} now)"
        for key in sorted(set(saved) | set(now))
        if key not in may_change and saved.get(key) != now.get(key)
    ]
    if differ:
        raise ValueError(
            f"{path}: cannot resume, this run differs from the checkpoint's in {'; '.join(differ)}; resume with the "
            "same options, or train into a new output folder"
        )
    if ckpt.step > steps:
        raise ValueError(f"{path}: the checkpoint is at step {ckpt.step}, beyond the {steps} steps asked for")
    return ckpt


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
    identity: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train the parameters of ``model`` that require grad (all, or an adapter's) on ``batches``.

    Writes ``out_dir/checkpoint.safetensors`` (trained weights, their EMA, optimizer, RNG, step, loss log) every
    ``checkpoint_every`` steps and at the end, atomically, and the loss of every step so far to
    ``out_dir/loss.json``; with ``resume`` an existing checkpoint is continued exactly, if :func:`check_resume`
    finds it made by the same run (``identity``: what else the caller wants checked, e.g. base model and data).
    A loss that is inf or nan stops the run with :class:`TrainingDiverged` before it changes any weight; the last
    checkpoint written stays the last good one.
    ``on_checkpoint(step, model)`` runs after each checkpoint (validation at intervals) on the main process, the
    model in eval mode and holding the EMA weights if an EMA is kept (swapped in place, then back); it must not
    touch the training generator. It may return images to log (``{name: (N, 3, H, W) in [0, 1]}``). With
    ``config.report_to`` the loss and learning rate of every step, and those images, go to accelerate's trackers
    under ``out_dir/logs``. SIGINT / SIGTERM stop the run between steps with a checkpoint and raise
    :class:`TrainingInterrupted`. ``log`` gets a line when the run resumes.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: output directory is a file")
    ckpt_path = out_dir / "checkpoint.safetensors"
    for stale in out_dir.glob(f".{ckpt_path.name}.*.tmp"):  # left by a process killed while writing
        stale.unlink()
    accelerator = _accelerator(config, out_dir)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("the model has no trainable parameter")
    state = _State(
        trainable=trainable,
        ema={name: p.detach().clone() for name, p in trainable.items()} if config.ema_decay > 0 else None,
        optimizer=make_optimizer(list(trainable.values()), config, accelerator.device),
        generator=torch.Generator().manual_seed(config.seed),
        losses=[],
        meta={"recipe": recipe.describe(), "train": asdict(config), **(identity or {})},
    )
    start = state.resume(ckpt_path, config.steps) if resume and ckpt_path.exists() else 0
    saved = [start] if start else []
    if start and log is not None:
        log(f"resuming from step {start} of {config.steps} ({ckpt_path})")
    model, state.optimizer = accelerator.prepare(model, state.optimizer)
    if state.ema is not None:
        state.ema = {name: value.to(accelerator.device) for name, value in state.ema.items()}
    if config.report_to != "none":
        accelerator.init_trackers("logs", config={k: v for k, v in _flat(state.meta).items() if _scalar(v)})

    def checkpoint(step: int, rng: torch.Tensor | None = None) -> None:
        # Every process holds the same state (same draws, averaged gradients); the main one writes it.
        if accelerator.is_main_process:
            state.save(ckpt_path, step, rng)
            saved.append(step)
            if on_checkpoint is not None:
                images = _call_with_ema(on_checkpoint, step, accelerator.unwrap_model(model), state)
                for tracker in accelerator.trackers if images else ():
                    tracker.log_images(images, step=step, dataformats="NCHW")
        accelerator.wait_for_everyone()

    world = accelerator.num_processes
    params = list(trainable.values())
    bar = tqdm(
        total=config.steps,
        initial=start,
        desc=description or f"train {recipe.name}",
        disable=not progress or not accelerator.is_local_main_process,
    )
    model.train()
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
            for group in state.optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            rng = state.generator.get_state()  # before this step's draws: what a checkpoint here replays from
            loss = _accumulate(model, batches, recipe, config, state.generator, accelerator)
            if not math.isfinite(loss):
                bar.close()
                raise _diverged(loss, step, saved, ckpt_path, config)
            # The weights this step starts from are checkpointed once their loss is known to be finite, so a
            # checkpoint is always one a run can go on from; a resumed run replays this step's draws exactly.
            if step > start and step % config.checkpoint_every == 0:
                checkpoint(step, rng)
            if config.grad_clip > 0:
                accelerator.clip_grad_norm_(params, config.grad_clip)
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
            if state.ema is not None:
                # TensorFlow's warm-up of the decay, (1 + n) / (10 + n): 0.1 at the first step, so the average follows
                # the early weights instead of keeping the random init for ~1 / (1 - decay) steps.
                decay = min(config.ema_decay, (1 + step) / (10 + step))
                torch._foreach_lerp_(list(state.ema.values()), [p.detach() for p in params], 1 - decay)
            state.losses.append(loss)
            if config.report_to != "none":
                accelerator.log({"loss": state.losses[-1], "lr": lr_at(step, config)}, step=step + 1)
            bar.update(1)
            bar.set_postfix(loss=f"{state.losses[-1]:.4f}")
    bar.close()
    # The final checkpoint: not again for a run resumed from a checkpoint already at the last step (it is that one).
    if start < config.steps or not ckpt_path.exists():
        checkpoint(config.steps)
    trained = accelerator.unwrap_model(model)
    accelerator.end_training()  # closes the trackers' files
    accelerator.free_memory()  # drops accelerate's references to the optimizer and its state
    return TrainResult(trained, state.ema, state.losses)


def _accumulate(model, batches: Batches, recipe: Recipe, config: TrainConfig, generator, accelerator) -> float:
    """The loss of one optimizer step, its gradients accumulated: ``grad_accum`` global batches (``batch_size`` per
    process), drawn on the CPU from the run's generator in every process alike; each process trains on its shard
    and DDP averages the gradients."""
    world, rank = accelerator.num_processes, accelerator.process_index
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
                generator,
                weight=batch.weight,
                rank=rank,
                world=world,
                device=accelerator.device,
            )
            accelerator.backward(micro / config.grad_accum)
        loss += float(accelerator.reduce(micro.detach(), "mean")) / config.grad_accum
    return loss


def _diverged(loss: float, step: int, saved: list[int], path: Path, config: TrainConfig) -> TrainingDiverged:
    """The error of a run whose loss is not finite at ``step``, naming the last checkpoint (every one written had a
    finite loss), and the marker that lets a resume from it lower the learning rate."""
    write_bytes(path.parent / DIVERGED, json.dumps({"step": step, "loss": str(loss), "lr": config.lr}).encode())
    kept = f"the last good checkpoint is step {saved[-1]}, {path}: resume it" if saved else "no checkpoint yet: start"
    return TrainingDiverged(
        f"the loss is {loss} at step {step}: training stopped before it changed a weight; {kept} with a lower "
        "`train.lr`, or check the data"
    )


def _scalar(value) -> bool:
    return isinstance(value, int | float | str | bool)


def _call_with_ema(callback, step: int, model: torch.nn.Module, state: _State):
    """``callback(step, model)`` with the model in eval mode, holding the EMA weights if any (swapped in place and
    back, so nothing is copied); returns what it returns."""
    if state.ema is not None:
        swap(state.trainable, state.ema)
    model.eval()
    try:
        with torch.no_grad():
            return callback(step, model)
    finally:
        model.train()
        if state.ema is not None:
            swap(state.trainable, state.ema)
