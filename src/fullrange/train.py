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
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import AutocastKwargs, DistributedType
from tqdm.auto import tqdm

from .batches import Batches
from .checkpoint import Checkpoint, save_checkpoint
from .config import MAX_SEED, ConfigError, check_choice, check_finite, check_range, setting
from .files import write_bytes
from .losses import Recipe, batch_loss
from .optimizers import OPTIMIZERS, PACKAGES, WHOLE, PerTensor, check_runs, make_optimizer
from .precision import HALF, cast_parameters

MIXED_PRECISIONS = ("no", "fp16", "bf16")
_SMALL_ACTIVATIONS = {"mixed_precision": "bf16", "gradient_checkpointing": True}
_FUSED = _SMALL_ACTIVATIONS | {"optimizer": "adafactor", "fused_backward": True, "grad_clip": 0.0}
MEMORY_PRESETS = {
    "24gb": ({"mixed_precision": "bf16"}, _FUSED),
    "16gb": ({"mixed_precision": "bf16"}, _FUSED),
    "12gb": (_SMALL_ACTIVATIONS, _FUSED | {"full_bf16": True}),
    "8gb": (_SMALL_ACTIVATIONS | {"full_bf16": True}, _FUSED | {"full_bf16": True}),
}
"""``train.memory``: the settings for a card of that size, for an adapter (LoRA, OFT) and for a full fine-tune,
chosen by ``benchmarks/device_memory.py`` (the README's table: what each projects on SD 1.5 and SDXL)."""
LR_SCHEDULES = ("constant", "linear", "cosine")
TRACKERS = ("none", "tensorboard")


@dataclass(frozen=True)
class TrainConfig:
    """The ``[train]`` table: how long and how fast to train, and in how much memory. ``optimizer``: see
    :mod:`fullrange.optimizers`. ``lr_schedule`` after a linear warm-up of ``warmup`` steps (default 10% of the
    steps, at most 100): see :func:`lr_at`. ``ema_decay = 0`` keeps no EMA at all. ``report_to``:
    ``"tensorboard"`` logs loss, learning rate and validation images through accelerate's trackers.

    Memory: under ``mixed_precision`` the frozen weights are stored in the half type (trained ones stay fp32);
    ``full_bf16`` stores the trained ones in bf16 too, with stochastically rounded updates; ``fused_backward`` steps
    each tensor as its gradient is ready and frees the gradient. ``memory`` names a preset of these for a card
    size; ``fullrange train`` (:func:`fullrange.sd.config.finetune_config`) lays the given options over it, while
    a ``TrainConfig`` built by hand takes its fields as given."""

    steps: int = setting(1000, "Training steps.")
    batch_size: int = setting(1, "Batch size (per process).")
    grad_accum: int = setting(1, "Batches accumulated per optimizer step.")
    lr: float = setting(1e-4, "Peak learning rate.", shown="1e-4")
    warmup: int | None = setting(None, "Linear warm-up steps.", shown="10% of `train.steps`, at most 100")
    grad_clip: float = setting(1.0, "Clip the gradients' norm to this (0: no clipping).")
    ema_decay: float = setting(0.0, "EMA decay of the trained weights.", shown="0, off: no copy is kept")
    checkpoint_every: int = setting(250, "Steps between checkpoints.")
    gradient_checkpointing: bool = setting(False, "Recompute activations in backward (less memory, slower).")
    mixed_precision: str = setting(
        "no", "no, fp16 or bf16: accelerate's autocast, and the frozen weights stored in that type."
    )
    seed: int = setting(0, "Seed of every random draw.")
    optimizer: str = setting(
        "adamw",
        "adamw, adafactor, prodigy (prodigyopt; its learning rate scales the step size it estimates: give 1.0), "
        "or bitsandbytes' adamw8bit, paged_adamw8bit, lion8bit (where they run on the device).",
    )
    lr_schedule: str = setting("cosine", "constant, linear or cosine decay after the warm-up.")
    report_to: str = setting(
        "none", "none or tensorboard: loss, learning rate and validation images in OUT/train/logs."
    )
    full_bf16: bool = setting(
        False,
        "Trained weights, gradients and optimizer moments in bf16, updates rounded stochastically (needs "
        "`train.mixed_precision` bf16).",
    )
    fused_backward: bool = setting(
        False,
        "Step each tensor as soon as its gradient is ready and free the gradient (one process, `train.grad_accum` 1, "
        "`train.grad_clip` 0, not fp16).",
    )
    memory: str | None = setting(
        None,
        "8gb, 12gb, 16gb or 24gb: the memory settings for a card of that size (the README's table); options given "
        "override it.",
        shown="none",
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
        if self.memory is not None:
            check_choice("memory", self.memory, tuple(MEMORY_PRESETS))
        # Packages the choices need, checked before anything is loaded (whether bitsandbytes runs on the device is
        # tried when training starts).
        needs = {"report_to": {"tensorboard": "tensorboard"}, "optimizer": PACKAGES}
        for name, packages in needs.items():
            package = packages.get(getattr(self, name))
            if package is not None and importlib.util.find_spec(package) is None:
                raise ConfigError(name, f"{getattr(self, name)} needs the {package} package (pip install {package})")
        if self.optimizer == "prodigy" and self.lr < 0.1:
            raise ConfigError(
                "lr", f"{self.lr} with prodigy: its lr multiplies the step size it estimates; use 1.0 (its authors')"
            )
        if self.full_bf16 and self.mixed_precision != "bf16":
            raise ConfigError("full_bf16", f"needs mixed_precision bf16, got {self.mixed_precision!r}")
        if self.optimizer in WHOLE and (self.fused_backward or self.full_bf16):
            flag = "fused_backward" if self.fused_backward else "full_bf16"
            raise ConfigError(flag, f"steps one tensor at a time, and {self.optimizer} needs all of them at once")
        if self.fused_backward:
            reasons = (
                (self.grad_accum > 1, "needs grad_accum 1: each gradient is applied as soon as it exists"),
                (
                    self.grad_clip > 0,
                    "needs grad_clip 0: the norm of all gradients is known only after each was applied (adafactor "
                    "clips its own updates)",
                ),
                (
                    self.mixed_precision == "fp16",
                    "does not work with fp16: its loss scaling must see every gradient before any step; use bf16",
                ),
            )
            for refused, why in reasons:
                if refused:
                    raise ConfigError("fused_backward", why)

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else min(100, max(1, self.steps // 10))


def memory_preset(card: str, full: bool) -> dict:
    """The ``[train]`` settings of preset ``card`` (:data:`MEMORY_PRESETS`) for a full fine-tune or an adapter;
    ``{}`` for a name that is not one (the config then refuses it)."""
    return MEMORY_PRESETS[card][full] if card in MEMORY_PRESETS else {}


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


def prepare(model: torch.nn.Module, config: TrainConfig) -> dict[str, torch.nn.Parameter]:
    """Make ``model`` ready to train as ``config`` says, in place: gradient checkpointing, the frozen weights in the
    half type of ``mixed_precision`` and with ``full_bf16`` the trained ones in bf16. Returns the trained parameters
    by name (a ``ValueError`` if there is none)."""
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if config.mixed_precision != "no":
        cast_parameters(model, HALF[config.mixed_precision])
    if config.full_bf16:
        cast_parameters(model, torch.bfloat16, trained=True)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("the model has no trainable parameter")
    return trainable


def make_stepper(params: list[torch.nn.Parameter], config: TrainConfig, device: torch.device):
    """The optimizer ``config`` names over ``params``, refused before training if it cannot run on ``device``;
    with ``fused_backward`` or ``full_bf16`` one per tensor (:class:`~fullrange.optimizers.PerTensor`), fused into
    the backward pass with the first."""
    check_runs(config.optimizer, device)
    if not (config.fused_backward or config.full_bf16):
        return make_optimizer(params, config.optimizer, config.lr)
    stepper = PerTensor(params, lambda one: make_optimizer(one, config.optimizer, config.lr), bf16=config.full_bf16)
    if config.fused_backward:
        stepper.fuse()
    return stepper


def train_step(
    model, batches: Batches, recipe: Recipe, config: TrainConfig, generator, accelerator, optimizer, params, ready
) -> float:
    """One optimizer step: the loss of ``grad_accum`` batches and its gradients (:func:`_accumulate`), the
    gradients' norm clipped (over ``params``, the trained ones), the step; returns the loss. ``ready(loss)`` runs
    once the loss is known, before any weight changes (with a fused backward, before the pass that steps them)."""
    loss = _accumulate(model, batches, recipe, config, generator, accelerator, ready)
    if config.grad_clip > 0:
        accelerator.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


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


AUTOCAST = AutocastKwargs(cache_enabled=False)
"""Autocast without its cache of half copies of the trained weights: the cache keeps a copy of every trained weight
alive until the forward pass ends (5.1 GB for a full SDXL fine-tune with gradient checkpointing, which would not
keep them), and a UNet uses each weight once per pass, so nothing is cast twice without it."""


def _accelerator(config: TrainConfig, log_dir: Path) -> Accelerator:
    tracking = {} if config.report_to == "none" else {"log_with": config.report_to, "project_dir": log_dir}
    cpu = not torch.cuda.is_available()
    try:
        return Accelerator(mixed_precision=config.mixed_precision, cpu=cpu, kwargs_handlers=[AUTOCAST], **tracking)
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
    # A setting added since the checkpoint was written, left at its default, is the behaviour it was written with.
    added = {f"train.{f.name}" for f in fields(TrainConfig) if f.default is not MISSING}
    added = {key for key in added - set(saved) if now.get(key) == getattr(TrainConfig, key.split(".")[1])}
    differ = [
        f"{key} ({saved.get(key, 'absent')!r} in the checkpoint, {now.get(key, 'absent')!r} now)"
        for key in sorted(set(saved) | set(now))
        if key not in may_change and key not in added and saved.get(key) != now.get(key)
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
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # The loop holds the trained parameters and checkpoints them itself; sharding engines replace them.
        raise ConfigError(
            "accelerate launch",
            f"with {accelerator.distributed_type.value}: fullrange trains in one process or with DDP (its checkpoints "
            "hold the parameters it trains, which sharding replaces); launch without --use_fsdp / --use_deepspeed",
        )
    if config.fused_backward and accelerator.num_processes > 1:
        raise ConfigError("fused_backward", "works in one process: the gradients are averaged after it applied them")
    trainable = prepare(model, config)
    state = _State(
        trainable=trainable,
        # The EMA is kept in fp32 whatever the weights' type (bf16 would round its small steps away).
        ema={n: p.detach().to(torch.float32, copy=True) for n, p in trainable.items()} if config.ema_decay else None,
        optimizer=make_stepper(list(trainable.values()), config, accelerator.device),
        generator=torch.Generator().manual_seed(config.seed),
        losses=[],
        meta={"recipe": recipe.describe(), "train": asdict(config), **(identity or {})},
    )
    start = state.resume(ckpt_path, config.steps) if resume and ckpt_path.exists() else 0
    saved = [start] if start else []
    if start and log is not None:
        log(f"resuming from step {start} of {config.steps} ({ckpt_path})")
    if isinstance(state.optimizer, PerTensor):  # not a torch optimizer: accelerate has nothing to add to it
        model = accelerator.prepare(model)
    else:
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
            if isinstance(state.optimizer, PerTensor):  # its stochastic rounding, replayed alike on resume
                state.optimizer.begin(_step_seed(config.seed, step))
            rng = state.generator.get_state()  # before this step's draws: what a checkpoint here replays from

            def ready(loss: float, step: int = step, rng: torch.Tensor = rng) -> None:
                if not math.isfinite(loss):
                    bar.close()
                    raise _diverged(loss, step, saved, ckpt_path, config)
                # The weights this step starts from are checkpointed once their loss is known to be finite, so a
                # checkpoint is always one a run can go on from; a resumed run replays this step's draws exactly.
                if step > start and step % config.checkpoint_every == 0:
                    checkpoint(step, rng)

            args = (model, batches, recipe, config, state.generator, accelerator, state.optimizer, params, ready)
            loss = train_step(*args)
            if state.ema is not None:
                # TensorFlow's warm-up of the decay, (1 + n) / (10 + n): 0.1 at the first step, so the average follows
                # the early weights instead of keeping the random init for ~1 / (1 - decay) steps.
                decay = min(config.ema_decay, (1 + step) / (10 + step))
                weights = [p.detach() for p in params]
                if config.full_bf16:  # an fp32 copy of one bf16 tensor at a time
                    for average, weight in zip(state.ema.values(), weights, strict=True):
                        average.lerp_(weight.float(), 1 - decay)
                else:
                    torch._foreach_lerp_(list(state.ema.values()), weights, 1 - decay)
            state.losses.append(loss)
            if config.report_to != "none":
                accelerator.log({"loss": state.losses[-1], "lr": lr_at(step, config)}, step=step + 1)
            bar.update(1)
            bar.set_postfix(loss=f"{state.losses[-1]:.4f}")
    bar.close()
    if isinstance(state.optimizer, PerTensor):
        state.optimizer.unfuse()
    # The final checkpoint: not again for a run resumed from a checkpoint already at the last step (it is that one).
    if start < config.steps or not ckpt_path.exists():
        checkpoint(config.steps)
    trained = accelerator.unwrap_model(model)
    accelerator.end_training()  # closes the trackers' files
    accelerator.free_memory()  # drops accelerate's references to the optimizer and its state
    return TrainResult(trained, state.ema, state.losses)


def _accumulate(model, batches: Batches, recipe: Recipe, config: TrainConfig, generator, accelerator, ready) -> float:
    """The loss of one optimizer step, its gradients accumulated: ``grad_accum`` global batches (``batch_size`` per
    process), drawn on the CPU from the run's generator in every process alike; each process trains on its shard
    and DDP averages the gradients. ``ready(loss)`` runs once the loss is known: after the last backward pass, or
    with a fused backward (whose backward pass steps the weights) before it."""
    world, rank = accelerator.num_processes, accelerator.process_index
    loss = 0.0
    for micro_step in range(config.grad_accum):
        batch = batches(config.batch_size * world, generator)
        sync = micro_step == config.grad_accum - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            with accelerator.autocast():
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
            loss += float(accelerator.reduce(micro.detach(), "mean")) / config.grad_accum
            if config.fused_backward:
                ready(loss)
            accelerator.backward(micro / config.grad_accum)
    if not config.fused_backward:
        ready(loss)
    return loss


def _step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s stochastic rounding: distinct per step, the same in every run of ``seed``."""
    return (seed * 1_000_003 + step) % 2**63


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
