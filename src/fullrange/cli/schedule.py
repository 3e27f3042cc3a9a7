"""``fullrange schedule``: the steps a sampler visits, and how strongly the image mean leaks through the noise."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer

from .. import metrics, plots, schedules, timesteps
from ._errors import fail


def parse_resolution(text: str) -> tuple[int, ...]:
    """``64x64x4`` (H x W x C, or any number of sides) into positive ints."""
    try:
        sides = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        sides = ()
    if not sides or min(sides) <= 0:
        fail(f"--resolution {text!r} is not like 64x64x4 (positive sizes separated by 'x')")
    return sides


Schedule = Annotated[str, typer.Option("--schedule", help="linear, scaled_linear, cosine or rectified_flow.")]
Shift = Annotated[float, typer.Option(help="Rectified flow's time shift (SD3: 3; 1: none).")]
ZeroTerminalSNR = Annotated[bool, typer.Option(help="Rescale to zero terminal SNR (Lin et al. Alg. 1).")]
TrainTimesteps = Annotated[int, typer.Option("--train-timesteps", help="T, the training timesteps.")]
Spacing = Annotated[str, typer.Option(help="leading, linspace, trailing, or a σ ladder: karras, exponential.")]
Steps = Annotated[int, typer.Option(help="Sample steps.")]
StepsOffset = Annotated[int, typer.Option(help="Added to leading steps (Stable Diffusion uses 1).")]
Resolution = Annotated[
    str, typer.Option(help="Size of one sample, HxWxC (SD's latent): N of the mean leak, and the top of a σ ladder.")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Plot = Annotated[Path | None, typer.Option(help="Also write a PNG plot of log SNR and mean leak.")]


def schedule_command(
    name: Schedule = "scaled_linear",
    zero_terminal_snr: ZeroTerminalSNR = False,
    num_train_timesteps: TrainTimesteps = 1000,
    spacing: Spacing = "trailing",
    steps: Steps = 10,
    steps_offset: StepsOffset = 0,
    shift: Shift = 1.0,
    resolution: Resolution = "64x64x4",
    as_json: AsJson = False,
    plot: Plot = None,
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
        if shift != 1.0:
            if not isinstance(schedule, schedules.RectifiedFlow):
                fail(f"--shift applies to --schedule rectified_flow, not {name}")
            schedule = schedules.with_shift(schedule, shift)
        rows = timesteps.describe_plan(schedule, steps, spacing, steps_offset, num_values)
    except ValueError as err:
        fail(str(err))
    terminal = {"terminal_snr": float(schedule.snr[-1])}
    terminal["terminal_mean_leak"] = float(metrics.mean_leak(schedule.snr[-1], num_values))
    asked = {"schedule": name, "zero_terminal_snr": zero_terminal_snr, "num_train_timesteps": num_train_timesteps}
    asked |= {"spacing": spacing, "steps": steps, "resolution": resolution, "num_values": num_values}
    summary = asked | terminal | {"plan": rows}
    if plot is not None:
        label = f"{name}{' (zero terminal SNR)' if zero_terminal_snr else ''}"
        t = torch.tensor([row["t"] for row in rows], dtype=torch.float64)
        try:
            plots.schedule_plot(schedule, t, num_values, plot, label)
        except OSError as err:
            fail(f"--plot {plot}: cannot write ({err.strerror})")
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
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
        cells = (f"{row['t']:g}", f"{row['alphas_cumprod']:.6g}", f"{row['snr']:.6g}", sigma, f"{row['mean_leak']:.4g}")
        table.add_row(str(row["step"]), *cells)
    console = Console(file=sys.stdout)
    console.print(table)
    console.print(
        f"terminal SNR {summary['terminal_snr']:.6g}; at t = T-1 a unit image-mean shift is "
        f"{summary['terminal_mean_leak']:.3g} std of the noise's own mean"
    )
