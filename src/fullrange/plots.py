"""The one home of matplotlib: its headless setup, figures written atomically, and the plots of the commands (the
schedule's log SNR and mean leak, the brightness a model reaches per prompt). The reproduction's experiments compose
their own figures through :func:`pyplot` and :func:`save_figure`."""

from __future__ import annotations

from pathlib import Path

import torch

from . import metrics
from .files import atomic_path
from .schedules import Schedule


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path | str, dpi: int = 110) -> str:
    """Lay out ``fig``, write it to ``path`` as PNG atomically and close it; returns the file's name."""
    path = Path(path)
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        pyplot().close(fig)
    return path.name


def log_steps_axis(ax, steps) -> None:
    """A log x axis labelled at exactly the step counts used."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_xticks(list(steps), [str(s) for s in steps])
    ax.xaxis.set_minor_formatter(NullFormatter())


def schedule_plot(schedule: Schedule, t: torch.Tensor, num_values: int, path: Path | str, label: str) -> str:
    """log SNR over the training timesteps with the sample steps ``t`` marked, and the mean leak √(SNR·N) of
    samples of ``num_values`` values (:func:`fullrange.metrics.mean_leak`)."""
    all_t = schedule.timesteps.numpy()
    fig, (top, bottom) = pyplot().subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(all_t, schedule.log_snr.numpy(), label=label)
    visited = schedule.alphas_cumprod_at(t)
    log_snr = (visited / (1 - visited)).log().clamp(min=-20)
    top.scatter(t.numpy(), log_snr.numpy(), color="C3", zorder=3, label="sample steps (log SNR -inf drawn at -20)")
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
    return save_figure(fig, path, dpi=120)


def brightness_per_prompt(all_results: dict[str, dict], path: Path | str) -> str:
    """Mean brightness per prompt, one bar per model (``{model: {prompt: {"mean_brightness": …}}}``)."""
    prompts = list(next(iter(all_results.values())))
    fig, ax = pyplot().subplots(figsize=(10, 0.45 * len(prompts) + 1.5))
    height = 0.8 / len(all_results)
    for k, (name, results) in enumerate(all_results.items()):
        ys = [i + k * height for i in range(len(prompts))]
        ax.barh(ys, [results[p]["mean_brightness"] for p in prompts], height, label=name)
    ax.set_yticks([i + height * (len(all_results) - 1) / 2 for i in range(len(prompts))], prompts, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.5, color="gray", linestyle="--")
    ax.set(xlabel="mean brightness of the images (0 black, 1 white)", xlim=(0, 1), title="Brightness per prompt")
    ax.legend()
    return save_figure(fig, path)
