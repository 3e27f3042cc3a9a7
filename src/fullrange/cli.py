"""Command line: thin wrappers that parse, validate and call the library."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import typer

from . import metrics, schedules, timesteps

app = typer.Typer(
    help="fullrange: diffusion models whose outputs reach the full brightness range.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """fullrange: diffusion models whose outputs reach the full brightness range."""


def fail(message: str) -> None:
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


def _plan(schedule: schedules.Schedule, steps: int, spacing: str, steps_offset: int):
    if spacing in timesteps.LADDERS:
        return timesteps.ladder(schedule, steps, spacing)
    return timesteps.spaced(schedule.num_train_timesteps, steps, spacing, steps_offset).double()


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
        t = _plan(schedule, steps, spacing, steps_offset)
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
        "quick", help="micro (seconds, smoke test), quick (~10 min on 2 CPU cores), full (GPU)."
    ),
    only: list[str] | None = typer.Option(None, help="Run only this experiment (repeatable)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Reproduce the seed documents' findings on the built-in data set and write a report."""
    from . import reproduce

    if preset not in reproduce.PRESETS:
        fail(f"--preset {preset!r} is unknown; choose one of {', '.join(reproduce.PRESETS)}")
    unknown = [name for name in only or [] if name not in reproduce.EXPERIMENTS]
    if unknown:
        fail(f"--only {', '.join(unknown)}: unknown experiment; choose from {', '.join(reproduce.EXPERIMENTS)}")
    try:
        reproduce.check_out_dir(out)
        reproduce.run(out, preset, only, progress=progress, log=lambda line: typer.echo(line, err=True))
    except ValueError as err:
        fail(str(err))
