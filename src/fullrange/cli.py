"""Command line: thin wrappers that parse, validate and call the library."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import click
import typer
from typer.core import TyperGroup

from . import metrics, schedules, timesteps
from .config import ConfigError
from .files import read_text

DEBUG_ENV = "FULLRANGE_DEBUG"
QUICK_RUNTIME = "6 min 24 s"  # `fullrange reproduce`'s quick preset, measured; the README states the same (a test)


class OneLineErrors(TyperGroup):
    """Any exception a command lets through becomes one line on stderr naming the command (exit status 1); with
    ``--debug`` or ``FULLRANGE_DEBUG=1`` the stack trace is shown instead."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as err:
            if ctx.params.get("debug") or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            command = ctx.invoked_subcommand or ctx.info_name
            detail = (str(err).strip().splitlines() or [""])[0][:400]
            hint = ""
            if isinstance(err, MemoryError) or "out of memory" in detail or "allocate memory" in detail:
                hint = "; out of memory: lower --resolution, --batch-size or --num-images"
            typer.echo(
                f"error: fullrange {command}: {type(err).__name__}: {detail}{hint} "
                f"(--debug or {DEBUG_ENV}=1 shows the stack trace)",
                err=True,
            )
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=OneLineErrors,
    help="fullrange: diffusion models whose outputs reach the full brightness range.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: Rich markup would eat "[default: …]" and "[model]"
)


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help=f"Show stack traces (also: {DEBUG_ENV}=1)."),
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=lambda given: _print_version(given), help="Print the version."
    ),
) -> None:
    """fullrange: diffusion models whose outputs reach the full brightness range."""
    # transformers warns at import about optional image processors fullrange never uses.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _print_version(given: bool) -> None:
    if given:
        from importlib.metadata import version

        typer.echo(f"fullrange {version('fullrange')}")
        raise typer.Exit()


def fail(message: str) -> NoReturn:
    """One line on stderr, exit status 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def parse_resolution(text: str) -> tuple[int, ...]:
    """``64x64x4`` (H x W x C, or any number of sides) into positive ints."""
    try:
        sides = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        sides = ()
    if not sides or min(sides) <= 0:
        fail(f"--resolution {text!r} is not like 64x64x4 (positive sizes separated by 'x')")
    return sides


@app.command("schedule")
def schedule_command(
    name: str = typer.Option("scaled_linear", "--schedule", help="linear, scaled_linear or cosine."),
    zero_terminal_snr: bool = typer.Option(False, help="Rescale to zero terminal SNR (Lin et al. Alg. 1)."),
    num_train_timesteps: int = typer.Option(1000, "--train-timesteps", help="T, the training timesteps."),
    spacing: str = typer.Option("trailing", help="leading, linspace, trailing, or a σ ladder: karras, exponential."),
    steps: int = typer.Option(10, help="Sample steps."),
    steps_offset: int = typer.Option(0, help="Added to leading steps (Stable Diffusion uses 1)."),
    resolution: str = typer.Option("64x64x4", help="Size of one sample, HxWxC, for the mean leak (SD latent)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    plot: Path | None = typer.Option(None, help="Also write a PNG plot of log SNR and mean leak."),
) -> None:
    """Print, per sample step, t, ᾱ, SNR, σ and how strongly the image mean leaks through the noise."""
    num_values = math.prod(parse_resolution(resolution))
    if steps <= 0:
        fail(f"--steps must be positive, got {steps}")
    if spacing not in timesteps.SPACINGS + timesteps.LADDERS:
        fail(f"--spacing {spacing!r} is unknown; choose one of {', '.join(timesteps.SPACINGS + timesteps.LADDERS)}")
    if plot is not None and plot.suffix.lower() != ".png":
        fail(f"--plot {plot} must name a .png file")
    try:
        schedule = schedules.by_name(name, num_train_timesteps, zero_terminal_snr=zero_terminal_snr)
        t = timesteps.plan(schedule, steps, spacing, steps_offset).double()
    except ValueError as err:
        fail(str(err))
    ac = schedule.alphas_cumprod_at(t)
    snr = ac / (1 - ac)
    leak = metrics.mean_leak(snr, num_values)
    rows = [
        {
            "step": i,
            "t": round(float(t[i]), 3),
            "alphas_cumprod": float(ac[i]),
            "snr": float(snr[i]),
            "sigma": None if snr[i] == 0 else float(snr[i].rsqrt()),
            "mean_leak": float(leak[i]),
        }
        for i in range(len(t))
    ]
    summary = {
        "schedule": name,
        "zero_terminal_snr": zero_terminal_snr,
        "num_train_timesteps": num_train_timesteps,
        "spacing": spacing,
        "steps": steps,
        "resolution": resolution,
        "num_values": num_values,
        "terminal_snr": float(schedule.snr[-1]),
        "terminal_mean_leak": float(metrics.mean_leak(schedule.snr[-1], num_values)),
        "plan": rows,
    }
    if plot is not None:
        _plot_schedule(schedule, t, num_values, plot, f"{name}{' (zero terminal SNR)' if zero_terminal_snr else ''}")
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_table(summary)


def _print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (
        f"{summary['schedule']}{', zero terminal SNR' if summary['zero_terminal_snr'] else ''}: "
        f"{summary['steps']} {summary['spacing']} steps, mean leak at {summary['resolution']} "
        f"(N = {summary['num_values']})"
    )
    table = Table(title=title)
    for column in ("step", "t", "ᾱ", "SNR", "σ", "mean leak √(SNR·N)"):
        table.add_column(column, justify="right")
    for row in summary["plan"]:
        sigma = "inf" if row["sigma"] is None else f"{row['sigma']:.4g}"
        table.add_row(
            str(row["step"]),
            f"{row['t']:g}",
            f"{row['alphas_cumprod']:.6g}",
            f"{row['snr']:.6g}",
            sigma,
            f"{row['mean_leak']:.4g}",
        )
    console = Console(file=sys.stdout)
    console.print(table)
    console.print(
        f"terminal SNR {summary['terminal_snr']:.6g}; at t = T-1 a unit image-mean shift is "
        f"{summary['terminal_mean_leak']:.3g} std of the noise's own mean"
    )


def _plot_schedule(schedule: schedules.Schedule, t, num_values: int, path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_t = range(schedule.num_train_timesteps)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(all_t, schedule.log_snr.numpy(), label=label)
    visited = schedule.alphas_cumprod_at(t)
    top.scatter(
        t.numpy(),
        (visited / (1 - visited)).log().clamp(min=-20).numpy(),
        color="C3",
        zorder=3,
        label="sample steps (log SNR -inf drawn at -20)",
    )
    top.set_ylabel("log SNR")
    top.legend()
    top.grid(alpha=0.3)
    bottom.plot(all_t, metrics.mean_leak(schedule.snr, num_values).numpy(), color="C1")
    bottom.axhline(1.0, color="gray", linestyle="--", label="leak = noise-mean std")
    bottom.set_yscale("log")
    bottom.set_ylabel(f"mean leak √(SNR·N), N = {num_values}")
    bottom.set_xlabel("training timestep t")
    bottom.legend()
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except OSError as err:
        fail(f"--plot {path}: cannot write ({err.strerror})")
    finally:
        plt.close(fig)


@app.command("reproduce")
def reproduce_command(
    out: Path = typer.Option(Path("fullrange-report"), help="Output folder: results, plots, report.md/html."),
    preset: str = typer.Option(
        "quick",
        help=f"micro (seconds, smoke test), quick ({QUICK_RUNTIME} on 2 CPU cores in the last measured run; 3 seeds), "
        "full (for a GPU: about 216 h of training on a 2-core CPU).",
    ),
    only: list[str] | None = typer.Option(None, help="Run only this experiment (repeatable)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Reproduce the findings of the offset-noise article and the zero-terminal-SNR paper on the built-in data set, on
    the CPU, and write a report (report.md, report.html)."""
    from . import reproduce
    from .train import TrainingInterrupted

    if preset not in reproduce.PRESETS:
        fail(f"--preset {preset!r} is unknown; choose one of {', '.join(reproduce.PRESETS)}")
    unknown = [name for name in only or [] if name not in reproduce.EXPERIMENTS]
    if unknown:
        fail(f"--only {', '.join(unknown)}: unknown experiment; choose from {', '.join(reproduce.EXPERIMENTS)}")
    try:
        reproduce.check_out_dir(out)
        reproduce.run(out, preset, only, progress=progress, log=lambda line: typer.echo(line, err=True))
    except TrainingInterrupted as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(130) from None
    except ValueError as err:
        fail(str(err))


MODEL_CONFIG_HELP = "Diffusers folder with the configs of a single-file --model [default: bundled SD 1.x / 2.x / XL]."
SHA256_HELP = "Expected SHA-256 of a single-file --model, checked before loading."
SAMPLER_HELP = "Any of fullrange's samplers (default: unipc, the fewest-evaluation winner; see the README)."

# fullrange train: each flag (also a key of a flat --config file) and the config field it sets.
TRAIN_FLAGS = {
    "model": "model.path",
    "sha256": "model.sha256",
    "model-config": "model.config",
    "allow-pickle": "model.allow_pickle",
    "data": "data.path",
    "resolution": "data.resolution",
    "buckets": "data.buckets",
    "caption-dropout": "data.caption_dropout",
    "class-prompt": "data.class_prompt",
    "class-data": "data.class_data",
    "num-class-images": "data.num_class_images",
    "prior-loss-weight": "data.prior_loss_weight",
    "offset-noise": "noise.offset",
    "pyramid-noise": "noise.pyramid",
    "input-perturbation": "noise.input_perturbation",
    "zero-terminal-snr": "noise.zero_terminal_snr",
    "prediction": "noise.prediction",
    "min-snr-gamma": "noise.min_snr_gamma",
    "snr-weight-floor": "noise.snr_weight_floor",
    "adapter": "adapter.kind",
    "lora-rank": "adapter.rank",
    "oft-block-size": "adapter.block_size",
    "oft-coft": "adapter.coft",
    "text-encoder-lora": "adapter.text_encoder",
    "max-steps": "train.steps",
    "batch-size": "train.batch_size",
    "grad-accum": "train.grad_accum",
    "lr": "train.lr",
    "ema-decay": "train.ema_decay",
    "checkpoint-every": "train.checkpoint_every",
    "gradient-checkpointing": "train.gradient_checkpointing",
    "mixed-precision": "train.mixed_precision",
    "seed": "train.seed",
    "optimizer": "train.optimizer",
    "lr-schedule": "train.lr_schedule",
    "warmup": "train.warmup",
    "report-to": "train.report_to",
    "validation-prompt": "validation.prompts",
    "out": "output.path",
    "family": "output.family",
}
FLAT_ALIASES = {"validation-prompts": "validation-prompt"}
"""Keys of flat --config files written before the flag and the key were spelled alike."""
MODEL_FLAGS = {
    "model.path": "--model",
    "model.sha256": "--sha256",
    "model.config": "--model-config",
    "model.allow_pickle": "--allow-pickle",
}


def fail_on(err: Exception, flags: dict[str, str]) -> NoReturn:
    """``err`` on one line, the config fields it names spelled as this command's ``flags`` (field → flag)."""
    text = str(err)
    if isinstance(err, ConfigError) and err.field in flags:
        text = f"{flags[err.field]} {err.message}"
    for name in sorted((f for f in flags if "." in f), key=len, reverse=True):
        text = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w.])", flags[name], text)
    if isinstance(err, ConfigError) and err.message == "is required":
        text += " (on the command line or in --config)"
    fail(text.splitlines()[0] if text else type(err).__name__)


def train_tables(config_file: Path | None, flags: dict) -> dict:
    """The nested tables of ``fullrange train``: those of ``config_file`` (nested tables, or flat keys spelled
    as the flags), with the flags given laid over them."""
    from .sd.config import merge, read_toml

    def nest(pairs: dict, source: str) -> dict:
        tables: dict = {}
        for key, value in pairs.items():
            flag = key.replace("_", "-")
            flag = FLAT_ALIASES.get(flag, flag)
            if flag not in TRAIN_FLAGS:
                raise ValueError(f"{source}: unknown option {key!r}")
            table, name = TRAIN_FLAGS[flag].split(".")
            tables.setdefault(table, {})[name] = value
        return tables

    tables: dict = {}
    if config_file is not None:
        raw = read_toml(config_file)
        flat = {k: v for k, v in raw.items() if not isinstance(v, dict)}
        tables = merge({k: v for k, v in raw.items() if isinstance(v, dict)}, nest(flat, f"--config {config_file}"))
    return merge(tables, nest({k: v for k, v in flags.items() if v is not None}, "the command line"))


@app.command("train")
def train_command(
    model: str | None = typer.Option(
        None, help="Stable Diffusion 1.x / 2.x / XL: a local diffusers folder or a single .safetensors file."
    ),
    data: str | None = typer.Option(None, help="Folder of images with NAME.txt captions or a metadata.jsonl."),
    out: str | None = typer.Option(None, help="Output folder: checkpoints, cache, config.json, results."),
    family: str | None = typer.Option(
        None, help="sd1, sd2 or sdxl, for the kohya LoRA file a LoRA run writes [default: from the model]."
    ),
    config: Path | None = typer.Option(
        None,
        help="TOML file: tables [model], [data], [noise], [adapter], [train], [validation], [output], or these "
        "flags as keys. Flags override it.",
    ),
    adapter: str | None = typer.Option(None, help="full, lora or oft [default: lora]."),
    resolution: int | None = typer.Option(None, help="Training resolution in pixels [default: 512]."),
    max_steps: int | None = typer.Option(None, help="Training steps [default: 1000]."),
    batch_size: int | None = typer.Option(None, help="Batch size [default: 1]."),
    grad_accum: int | None = typer.Option(None, help="Batches accumulated per optimizer step [default: 1]."),
    gradient_checkpointing: bool | None = typer.Option(
        None, "--gradient-checkpointing", help="Recompute activations in backward (less memory, slower)."
    ),
    validation_prompt: list[str] | None = typer.Option(None, help="Prompt sampled at each checkpoint (repeatable)."),
    lr: float | None = typer.Option(None, help="Peak learning rate [default: 1e-4]."),
    optimizer: str | None = typer.Option(
        None, help="adamw, adafactor or adamw8bit (bitsandbytes, where it runs on the device) [default: adamw]."
    ),
    lr_schedule: str | None = typer.Option(
        None, help="constant, linear or cosine decay after the warm-up [default: cosine]."
    ),
    warmup: int | None = typer.Option(None, help="Linear warm-up steps [default: 10% of --max-steps, at most 100]."),
    report_to: str | None = typer.Option(
        None, help="none or tensorboard: loss, learning rate and validation images in OUT/train/logs [default: none]."
    ),
    offset_noise: float | None = typer.Option(
        None, help="Offset-noise strength, e.g. 0.1 (Guttenberg 2023) [default: 0, off]."
    ),
    pyramid_noise: float | None = typer.Option(None, help="Pyramid-noise discount, e.g. 0.8 [default: 0, off]."),
    input_perturbation: float | None = typer.Option(None, help="Input perturbation γ, e.g. 0.1 [default: 0, off]."),
    zero_terminal_snr: bool | None = typer.Option(None, "--zero-terminal-snr", help="Rescale to zero terminal SNR."),
    prediction: str | None = typer.Option(
        None, help="epsilon or v_prediction [default: the checkpoint's; v with --zero-terminal-snr]."
    ),
    min_snr_gamma: float | None = typer.Option(None, help="Min-SNR-γ loss weighting, e.g. 5 [default: 0, off]."),
    caption_dropout: float | None = typer.Option(
        None, help="Probability of training on the empty caption [default: 0.1]."
    ),
    class_prompt: str | None = typer.Option(None, help="Dreambooth prior preservation: the class prompt."),
    class_data: str | None = typer.Option(None, help="Folder of class images (captions default to --class-prompt)."),
    num_class_images: int | None = typer.Option(
        None, help="Class images to have; missing ones are generated [default: 0]."
    ),
    prior_loss_weight: float | None = typer.Option(None, help="Weight of the class images' loss [default: 1]."),
    lora_rank: int | None = typer.Option(None, help="LoRA rank [default: 4]."),
    oft_block_size: int | None = typer.Option(None, help="OFT block size [default: 4]."),
    ema_decay: float | None = typer.Option(
        None, help="EMA decay of the trained weights [default: 0, off: no copy is kept]."
    ),
    snr_weight_floor: float | None = typer.Option(
        None, help="Floor on the min-SNR weight (keeps SNR = 0 steps) [default: 0]."
    ),
    oft_coft: bool | None = typer.Option(None, "--oft-coft", help="Constrained OFT: ||R - I|| <= eps."),
    text_encoder_lora: bool | None = typer.Option(
        None, "--text-encoder-lora", help="Train a LoRA on the text encoder(s) too (with --adapter lora)."
    ),
    buckets: bool | None = typer.Option(None, "--buckets", help="Aspect-ratio buckets instead of square crops."),
    checkpoint_every: int | None = typer.Option(None, help="Steps between checkpoints [default: 250]."),
    mixed_precision: str | None = typer.Option(None, help="no, fp16 or bf16 (accelerate) [default: no]."),
    seed: int | None = typer.Option(None, help="Seed of every random draw [default: 0]."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT's checkpoint."),
    allow_pickle: bool | None = typer.Option(None, "--allow-pickle", help="Allow pickle weights (can run code)."),
    sha256: str | None = typer.Option(None, help=SHA256_HELP),
    model_config: str | None = typer.Option(None, help=MODEL_CONFIG_HELP),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Fine-tune Stable Diffusion on a folder of images with offset noise, zero terminal SNR, LoRA or OFT."""
    flags = {
        "model": model,
        "sha256": sha256,
        "model-config": model_config,
        "allow-pickle": allow_pickle,
        "data": data,
        "resolution": resolution,
        "buckets": buckets,
        "caption-dropout": caption_dropout,
        "class-prompt": class_prompt,
        "class-data": class_data,
        "num-class-images": num_class_images,
        "prior-loss-weight": prior_loss_weight,
        "offset-noise": offset_noise,
        "pyramid-noise": pyramid_noise,
        "input-perturbation": input_perturbation,
        "zero-terminal-snr": zero_terminal_snr,
        "prediction": prediction,
        "min-snr-gamma": min_snr_gamma,
        "snr-weight-floor": snr_weight_floor,
        "adapter": adapter,
        "lora-rank": lora_rank,
        "oft-block-size": oft_block_size,
        "oft-coft": oft_coft,
        "text-encoder-lora": text_encoder_lora,
        "max-steps": max_steps,
        "batch-size": batch_size,
        "grad-accum": grad_accum,
        "lr": lr,
        "ema-decay": ema_decay,
        "checkpoint-every": checkpoint_every,
        "gradient-checkpointing": gradient_checkpointing,
        "mixed-precision": mixed_precision,
        "seed": seed,
        "optimizer": optimizer,
        "lr-schedule": lr_schedule,
        "warmup": warmup,
        "report-to": report_to,
        "validation-prompt": validation_prompt or None,
        "out": out,
        "family": family,
    }
    from .sd.config import finetune_config
    from .sd.finetune import finetune
    from .train import TrainingInterrupted

    field_flags = {field: f"--{flag}" for flag, field in TRAIN_FLAGS.items()} | {"resume": "--resume"}
    field_flags |= {"model.fingerprint": "the --model weights", "data.fingerprint": "the --data images and captions"}
    try:
        options = finetune_config(train_tables(config, flags))
        has_checkpoint = Path(options.output.path, "train", "checkpoint.safetensors").exists()
        if has_checkpoint and not resume:
            fail(
                f"--out {options.output.path} holds a checkpoint: pass --resume to continue it, or choose a new folder"
            )
        if resume and not has_checkpoint:
            typer.echo(f"--resume: {options.output.path} holds no checkpoint yet; starting at step 0", err=True)
        finetune(options, progress=progress, log=lambda line: typer.echo(line, err=True))
    except TrainingInterrupted as err:
        typer.echo(str(err) + " with --resume", err=True)
        raise typer.Exit(130) from None
    except (ValueError, OSError) as err:  # data.DataError and ConfigError are ValueErrors
        fail_on(err, field_flags)


SAMPLE_FLAGS = MODEL_FLAGS | {
    "adapter": "--adapter",
    "sampler": "--sampler",
    "steps": "--steps",
    "spacing": "--spacing",
    "guidance": "--guidance",
    "guidance_rescale": "--guidance-rescale",
    "seed": "--seed",
    "resolution": "--resolution",
    "negative_prompt": "--negative-prompt",
    "tone": "--tone",
    "tone_image": "--tone-image",
    "tone_stats": "--tone-stats",
    "image": "--image",
    "strength": "--strength",
    "controlnet": "--controlnet",
    "control_image": "--control-image",
    "control_scale": "--control-scale",
    "mask": "--mask",
}
TONE_HELP = {
    "tone": "Start from this brightness (0 black … 1 white) or colour (#1a1a1a): works on any model (signal leak).",
    "tone_image": "Start from the lowest frequencies of this image's latent (its tones and layout).",
    "tone_stats": "Start from tones drawn per image from a file of fullrange tone-stats.",
}


def _load(model: str, sha256: str | None, model_config: Path | None, allow_pickle: bool = False):
    """The model on this process's device (a CUDA device if there is one, else the CPU)."""
    from .sd import load_stable_diffusion
    from .sd.config import ModelConfig
    from .train import process_state

    try:
        config = ModelConfig(model, sha256, None if model_config is None else str(model_config), allow_pickle)
    except ConfigError as err:
        raise err.within("model") from None
    return load_stable_diffusion(config).to(process_state().device)


@app.command("sample")
def sample_command(
    model: str = typer.Option(..., help="Diffusers folder (a checkpoint or fullrange's output) or .safetensors."),
    prompt: list[str] | None = typer.Option(None, help="Prompt (repeatable)."),
    prompts_file: Path | None = typer.Option(None, help="A text file with one prompt per line."),
    out: Path = typer.Option(
        ..., help="Output folder for the PNGs (SEED-PROMPT.png) and a grid; nothing is overwritten."
    ),
    adapter: Path | None = typer.Option(
        None, help="A LoRA (.safetensors file: diffusers', kohya's or peft's names; or a folder) or an OFT folder."
    ),
    adapter_strength: float = typer.Option(1.0, help="Strength of the adapter (LoRA scale; OFT rotation fraction)."),
    negative_prompt: str = typer.Option("", help="Negative prompt (the unconditional branch of guidance)."),
    sampler: str | None = typer.Option(None, help=SAMPLER_HELP),
    steps: int = typer.Option(25, help="Sample steps."),
    batch_size: int = typer.Option(
        1, help="Images sampled at once (image i keeps seed + i; stochastic samplers' noise depends on the batch)."
    ),
    dtype: str = typer.Option(
        "fp32", help="fp32, fp16 or bf16 weights (the sampler's arithmetic stays fp32; fp16 is slow on a CPU)."
    ),
    spacing: str | None = typer.Option(
        None,
        help="leading, linspace, trailing, karras or exponential (default: at zero terminal SNR a Karras ladder "
        "topped by the latent size, else the model's own).",
    ),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    guidance_rescale: float = typer.Option(0.0, help="Guidance rescale φ (Lin et al.; 0.7 recommended at zero SNR)."),
    seed: int = typer.Option(0, help="Seed of the first image; image i uses seed + i."),
    num_images: int = typer.Option(1, help="Images per prompt."),
    resolution: int | None = typer.Option(None, help="Image side in pixels [default: the UNet's]."),
    tone: str | None = typer.Option(None, help=TONE_HELP["tone"]),
    tone_image: Path | None = typer.Option(None, help=TONE_HELP["tone_image"]),
    tone_stats: Path | None = typer.Option(None, help=TONE_HELP["tone_stats"]),
    image: Path | None = typer.Option(None, help="img2img: start from this image, noised as --strength says."),
    strength: float = typer.Option(
        1.0, help="img2img: how much of the ladder to run, 0 < s <= 1 (1 at zero terminal SNR: from pure noise)."
    ),
    mask: Path | None = typer.Option(
        None, help="Inpainting: repaint --image where this mask is white (needs an inpainting UNet, 9 channels)."
    ),
    controlnet: Path | None = typer.Option(None, help="A ControlNet (diffusers folder, safetensors) to condition on."),
    control_image: Path | None = typer.Option(None, help="The ControlNet's condition image (edges, depth, ...)."),
    control_scale: float = typer.Option(1.0, help="How strongly the ControlNet's residuals are added."),
    prediction: str | None = typer.Option(
        None, help="What the model predicts: epsilon, v_prediction or sample [default: its markers' or config's]."
    ),
    zero_terminal_snr: bool | None = typer.Option(
        None, help="Whether it was trained with zero terminal SNR [default: its markers' or config's]."
    ),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (can run code)."),
    sha256: str | None = typer.Option(None, help=SHA256_HELP),
    model_config: Path | None = typer.Option(None, help=MODEL_CONFIG_HELP),
) -> None:
    """Sample Stable Diffusion with fullrange's samplers; PNGs carry their settings."""
    from .sampling import retrained
    from .sd import load_adapter
    from .sd.sample import SampleSettings, generate, resolve, save_grid, save_images

    prompts = list(prompt or [])
    if prompts_file is not None:
        if not prompts_file.is_file():
            fail(f"--prompts-file {prompts_file}: no such file")
        try:
            prompts += [line.strip() for line in read_text(prompts_file).splitlines() if line.strip()]
        except ValueError as err:
            fail(f"--prompts-file {err}")
    if not prompts:
        fail("give at least one --prompt or a --prompts-file")
    if num_images <= 0:
        fail(f"--num-images must be positive, got {num_images}")
    if batch_size <= 0:
        fail(f"--batch-size must be positive, got {batch_size}")
    if dtype not in DTYPES:
        fail(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if out.exists() and not out.is_dir():
        fail(f"--out {out}: is a file, not a directory")
    try:
        settings = SampleSettings(
            sampler,
            steps,
            spacing,
            guidance,
            guidance_rescale,
            seed,
            resolution,
            negative_prompt,
            **_tones(tone, tone_image, tone_stats),
            image=None if image is None else str(image),
            strength=strength,
            control_image=None if control_image is None else str(control_image),
            control_scale=control_scale,
            mask=None if mask is None else str(mask),
        )
        if (controlnet is None) != (control_image is None):
            fail("--controlnet and --control-image go together: give both or neither")
        sd_model = _load(model, sha256, model_config, allow_pickle)
        control_model = None if controlnet is None else _load_controlnet(controlnet, sd_model, allow_pickle)
        if adapter is not None:
            with _warnings_as_lines():
                sd_model = load_adapter(sd_model, adapter, adapter_strength)
        if prediction is not None or zero_terminal_snr is not None:
            try:
                spec = retrained(sd_model.spec, prediction, zero_terminal_snr)
            except ValueError as err:
                fail(f"--prediction / --zero-terminal-snr: {err}")
            sd_model = dataclasses.replace(sd_model, spec=spec)
        import torch

        sd_model.to(dtype=getattr(torch, DTYPES[dtype]))
        if control_model is not None:
            control_model.to(dtype=getattr(torch, DTYPES[dtype]))
        all_prompts = [p for p in prompts for _ in range(num_images)]
        effective, _ = resolve(sd_model, settings)  # what the PNGs record: the sampler and spacing picked too
        source = _source(sd_model, adapter, adapter_strength, dtype)
        from tqdm.auto import tqdm

        paths, images = [], []
        with _warnings_as_lines(), tqdm(total=steps * math.ceil(len(all_prompts) / batch_size), desc="sample") as bar:
            for start in range(0, len(all_prompts), batch_size):
                chunk = all_prompts[start : start + batch_size]
                part = dataclasses.replace(settings, seed=settings.seed + start)
                batch = generate(sd_model, chunk, part, callback=lambda info: bar.update(1), controlnet=control_model)
                paths += save_images(batch, chunk, dataclasses.replace(effective, seed=part.seed), out, source)
                images.append(batch)
        grid = save_grid(torch.cat(images), out, settings.seed)
    except (ValueError, OSError) as err:
        fail_on(err, SAMPLE_FLAGS)
    typer.echo(f"wrote {len(paths)} images ({paths[0].name} …) and {grid}", err=True)


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _source(model, adapter: Path | None, strength: float, dtype: str) -> dict:
    """What made the images, for their PNG chunks: model and adapter with A1111's hashes, the prediction type."""
    from importlib.metadata import version

    from .sd.pnginfo import lora_hash, model_hash

    return {
        "model": str(model.source),
        "model_hash": model_hash(model.source),
        "adapter": None if adapter is None else str(adapter),
        "adapter_hash": None if adapter is None else lora_hash(adapter),
        "adapter_strength": None if adapter is None else strength,
        "prediction_type": model.spec.prediction,
        "zero_terminal_snr": model.spec.schedule.zero_terminal_snr,
        "dtype": dtype,
        "fullrange": version("fullrange"),
    }


def _load_controlnet(path: Path, sd_model, allow_pickle: bool):
    """A diffusers ControlNet folder, on the UNet's device and dtype (safetensors only unless pickle is allowed)."""
    from diffusers import ControlNetModel

    if not path.is_dir():
        raise ConfigError("controlnet", f"{path}: not a folder (a diffusers ControlNet has config.json and weights)")
    try:
        controlnet = ControlNetModel.from_pretrained(path, use_safetensors=not allow_pickle)
    except (OSError, ValueError) as err:
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise ConfigError("controlnet", f"{path}: not a loadable ControlNet ({detail})") from None
    return controlnet.to(sd_model.unet.device, sd_model.unet.dtype).eval().requires_grad_(False)


def _tones(tone: str | None, tone_image: Path | None, tone_stats: Path | None) -> dict:
    paths = {"tone_image": tone_image, "tone_stats": tone_stats}
    return {"tone": tone} | {k: None if v is None else str(v) for k, v in paths.items()}


@contextlib.contextmanager
def _warnings_as_lines():
    """Library warnings (a leak at zero SNR, leading steps at zero SNR) as one ``warning:`` line each, and its
    notes (what ``fullrange.sample`` picked) as one ``note:`` line each."""
    notes = _Notes()
    logger = logging.getLogger("fullrange")
    level = logger.level
    logger.addHandler(notes)
    logger.setLevel(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            yield
        finally:
            logger.removeHandler(notes)
            logger.setLevel(level)
            for message in dict.fromkeys(notes.messages):
                typer.echo(f"note: {message}", err=True)
            for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
                typer.echo(f"warning: {message}", err=True)


class _Notes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@app.command("tone-stats")
def tone_stats_command(
    model: str = typer.Option(..., help="Diffusers folder or .safetensors: its VAE encodes the images."),
    data: Path = typer.Option(..., help="A folder of images (captions are not needed)."),
    out: Path = typer.Option(..., help="The .safetensors file to write, for sample --tone-stats."),
    resolution: int | None = typer.Option(None, help="Image side in pixels [default: the UNet's]."),
    sha256: str | None = typer.Option(None, help=SHA256_HELP),
    model_config: Path | None = typer.Option(None, help=MODEL_CONFIG_HELP),
) -> None:
    """Measure the tones of a folder of images (Everaert et al.'s joint Gaussian of the latents' lowest
    frequencies), to start samples from: fullrange sample --tone-stats FILE."""
    from .sd.tone import fit_stats, save_stats

    if out.suffix != ".safetensors":
        fail(f"--out {out}: the file name must end in .safetensors")
    if out.is_dir():
        fail(f"--out {out}: is a directory, not a file name")
    _refuse_overwrite(out, {"--model": model, "--model-config": model_config})
    flags = MODEL_FLAGS | {"resolution": "--resolution"}
    try:
        sd_model = _load(model, sha256, model_config)
        side = resolution or sd_model.unet.config.sample_size * sd_model.vae_scale_factor
        stats, count, skipped = fit_stats(sd_model, data, side)
        save_stats(out, stats, sd_model, count)
    except (ValueError, OSError) as err:
        fail_on(err, flags | {"data": "--data"})
    for problem in skipped:
        typer.echo(f"skipped {problem.path}: {problem.reason}", err=True)
    brightness = stats.mean.view(stats.channels, stats.k, stats.k)[:, 0, 0] / sd_model.vae.config.scaling_factor
    typer.echo(
        f"wrote {out}: {count} images at {side} px, {stats.k}×{stats.k} DCT coefficients of {stats.channels} latent "
        f"channels; channel means (unscaled) {', '.join(f'{v:.3f}' for v in brightness.tolist())}",
        err=True,
    )


@app.command("inspect")
def inspect_command(
    model: str = typer.Argument(..., help="Diffusers folder or single .safetensors file."),
    adapter: Path | None = typer.Option(None, help="A LoRA or OFT folder (or adapter file) used with the model."),
    probe: bool = typer.Option(False, "--probe", help="Run the probe even when the markers agree."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    model_config: Path | None = typer.Option(None, help=MODEL_CONFIG_HELP),
) -> None:
    """Say how a checkpoint must be sampled: family, prediction type and zero terminal SNR from every convention
    (diffusers, ComfyUI, kohya, modelspec), a probe where they are silent or disagree, and the settings to use."""
    from .sd.inspection import inspect

    if adapter is not None and not adapter.exists():
        fail(f"--adapter {adapter}: no such file or directory")
    try:
        found = inspect(
            model, None if adapter is None else str(adapter), model_config=_str(model_config), always_probe=probe
        )
    except (ValueError, OSError) as err:
        fail_on(err, MODEL_FLAGS | {"model.path": "MODEL", "adapter": "--adapter"})
    if as_json:
        typer.echo(found.to_json())
        return
    lines = [f"family: {found.family}", "markers:"]
    for m in found.found or ():
        meaning = m.prediction if m.prediction is not None else f"zero terminal SNR {m.zero_terminal_snr}"
        lines.append(f"  {m.convention:<9} {m.key} = {m.value} -> {meaning}  ({m.source})")
    if not found.found:
        lines.append("  none")
    lines += [f"  disagree on {c}" for c in found.decision.conflicts]
    if found.probe is not None:
        lines.append(f"probe: {found.probe.describe()}")
    lines += [
        f"prediction: {found.prediction} (from the {found.how['prediction']})",
        f"zero terminal SNR: {'on' if found.zero_terminal_snr else 'off'} ({found.how['zero_terminal_snr']})",
        *(f"note: {note}" for note in found.notes),
        f"sample with: fullrange sample --model {model} " + " ".join(_flag(k, v) for k, v in found.settings.items()),
        "diffusers scheduler config:",
        json.dumps(found.scheduler_config, indent=2),
    ]
    typer.echo("\n".join(lines))


def _refuse_overwrite(out: Path, inputs: dict[str, str | Path | None]) -> None:
    """Stop before ``--out`` would replace one of the command's ``inputs`` (flag → path), or a file inside one."""
    from .files import overwrites

    for flag, given in inputs.items():
        if given is not None and overwrites(out, given):
            fail(f"--out {out}: would overwrite {flag} {given}; write it elsewhere")


def _flag(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else flag.replace("--", "--no-", 1)
    return f"{flag} {value}"


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


eval_app = typer.Typer(help="Measure models.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(eval_app, name="eval")


@eval_app.command("brightness")
def eval_brightness_command(
    model: str = typer.Option(..., help="Local diffusers folder or single .safetensors file."),
    out: Path = typer.Option(..., help="Output folder: brightness.json, brightness.png, images per prompt."),
    adapter: Path | None = typer.Option(None, help="A LoRA or OFT folder written by fullrange train, on --model."),
    against: str | None = typer.Option(None, help="A second model to compare, side by side."),
    sampler: str | None = typer.Option(None, help=SAMPLER_HELP),
    steps: int = typer.Option(25, help="Sample steps."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    guidance_rescale: float = typer.Option(0.0, help="Guidance rescale φ."),
    num_images: int = typer.Option(4, help="Images per prompt."),
    resolution: int | None = typer.Option(None, help="Image side in pixels [default: the UNet's]."),
    seed: int = typer.Option(0, help="Seed of the first image."),
    tone: str | None = typer.Option(None, help="Also sample --model with this tone, to compare. " + TONE_HELP["tone"]),
    tone_image: Path | None = typer.Option(None, help="Also sample --model with this. " + TONE_HELP["tone_image"]),
    tone_stats: Path | None = typer.Option(None, help="Also sample --model with this. " + TONE_HELP["tone_stats"]),
    sha256: str | None = typer.Option(None, help=SHA256_HELP),
    model_config: Path | None = typer.Option(None, help=MODEL_CONFIG_HELP + " Also used for --against."),
) -> None:
    """Generate the offset-noise article's dark and bright prompts and report the brightness range reached; with a tone,
    --model is sampled with and without it, on the same prompts and seeds."""
    from .sd import load_adapter
    from .sd.eval import evaluate, summarize, write
    from .sd.sample import SampleSettings

    if num_images <= 0:
        fail(f"--num-images must be positive, got {num_images}")
    if out.exists() and not out.is_dir():
        fail(f"--out {out}: is a file, not a directory")
    results = {}
    tones = _tones(tone, tone_image, tone_stats)
    for name, path, lora, checksum in (("model", model, adapter, sha256), ("against", against, None, None)):
        if path is None:
            continue
        flags = SAMPLE_FLAGS if name == "model" else SAMPLE_FLAGS | {"model.path": "--against"}
        try:
            settings = SampleSettings(sampler, steps, None, guidance, guidance_rescale, seed, resolution)
            variants = {"": settings}
            given = {k: v for k, v in tones.items() if v is not None}
            if name == "model" and given:
                variants[" + " + ", ".join(f"{k.replace('_', ' ')} {Path(v).name}" for k, v in given.items())] = (
                    SampleSettings(sampler, steps, None, guidance, guidance_rescale, seed, resolution, **tones)
                )
            sd_model = _load(path, checksum, model_config)
            if lora is not None:
                sd_model = load_adapter(sd_model, lora)
            label = f"{Path(path).name}{' + ' + lora.name if lora else ''}"
            label = label if label not in results else f"{label} ({name})"
            for suffix, variant in variants.items():
                folder = out / (name + ("_tone" if suffix else ""))
                with _warnings_as_lines():
                    results[label + suffix] = evaluate(sd_model, variant, folder, num_images)
        except (ValueError, OSError) as err:
            fail_on(err, flags)
    try:
        out.mkdir(parents=True, exist_ok=True)
        report = write(results, out)
    except OSError as err:
        fail(f"--out {out}: cannot write ({err.strerror})")
    for label, res in results.items():
        summary = summarize(res)
        typer.echo(
            f"{label}: darkest dark prompt {summary['darkest_dark_prompt']:.3f}, brightest bright prompt "
            f"{summary['brightest_bright_prompt']:.3f}, range {summary['range']:.3f}"
        )
    typer.echo(f"wrote {report} and {out / 'brightness.png'}", err=True)


@app.command("export")
def export_command(
    model: str = typer.Option(..., help="Diffusers folder (e.g. OUT/pipeline of fullrange train) or .safetensors."),
    out: Path = typer.Option(..., help="The .safetensors file to write (a new folder with --format diffusers)."),
    adapter: Path | None = typer.Option(None, help="A LoRA or OFT folder written by fullrange train, merged in."),
    adapter_strength: float = typer.Option(1.0, help="Strength of the adapter."),
    family: str | None = typer.Option(None, help="Layout: sd1, sd2 or sdxl [default: from the model]."),
    precision: str = typer.Option("fp16", help="fp16, bf16 or fp32 weights in the file."),
    model_config: Path | None = typer.Option(None, help=MODEL_CONFIG_HELP),
    file_format: str = typer.Option(
        "single-file",
        "--format",
        help="single-file: the model (adapter merged in) in the LDM layout; diffusers: the same as a diffusers "
        "folder with its scheduler config; kohya: the --adapter LoRA alone, in kohya's format; lycoris: the "
        "--adapter OFT as LyCORIS weight differences (--model is the base) [default: single-file].",
    ),
) -> None:
    """Write what A1111, ComfyUI or diffusers load: a single-file checkpoint (LDM layout) with v_pred / ztsnr markers,
    a diffusers folder, a LoRA in kohya's format or an OFT in LyCORIS', with ss_* / modelspec metadata."""
    import torch

    from .sd import load_adapter
    from .sd.export import export, export_diffusers, export_kohya_lora, export_lycoris_oft

    adapter_formats = {"kohya": ("a LoRA", export_kohya_lora), "lycoris": ("an OFT", export_lycoris_oft)}
    if file_format not in ("single-file", "diffusers", *adapter_formats):
        fail(f"--format {file_format!r}: choose single-file, diffusers, kohya or lycoris")
    if file_format in adapter_formats and adapter is None:
        kind = adapter_formats[file_format][0]
        fail(f"--format {file_format} writes {kind} adapter: give it with --adapter (a folder of fullrange train)")

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if precision not in dtypes:
        fail(f"--precision {precision!r}: choose one of {', '.join(dtypes)}")
    if file_format == "diffusers":
        if out.exists():
            fail(f"--out {out}: already exists; --format diffusers writes a new folder")
    elif out.suffix != ".safetensors":
        fail(f"--out {out}: the file name must end in .safetensors")
    elif out.is_dir():
        fail(f"--out {out}: is a directory, not a file name")
    _refuse_overwrite(out, {"--model": model, "--adapter": adapter, "--model-config": model_config})
    try:
        sd_model = _load(model, None, model_config)
        if file_format in adapter_formats:
            adapter_formats[file_format][1](out, adapter, sd_model, family=family)
            typer.echo(f"wrote {out}: the adapter {adapter} in {file_format}'s format", err=True)
            return
        if adapter is not None:
            with _warnings_as_lines():
                sd_model = load_adapter(sd_model, adapter, adapter_strength)
        if file_format == "diffusers":
            export_diffusers(out, sd_model, dtype=dtypes[precision])
        else:
            export(out, sd_model, family=family, dtype=dtypes[precision])
    except (ValueError, OSError) as err:
        fail_on(err, SAMPLE_FLAGS | {"family": "--family"})
    typer.echo(
        f"wrote {out}: prediction {sd_model.spec.prediction}, zero terminal SNR "
        f"{sd_model.spec.schedule.zero_terminal_snr}",
        err=True,
    )
