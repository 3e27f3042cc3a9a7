"""Brightness error per model evaluation (NFE) at 3×32×32, SD's 4×64×64 and SDXL's 4×128×128 latents.

The model is an exact denoiser, so every error is the sampler's. Data (``--toy``): ``flat`` is
``fullrange.toy.MixtureToy`` (seven flat brightness levels + pixel noise 0.2); ``images`` is
``fullrange.toy.ImageMixtureToy`` over 16 scenes of the built-in data set (structure at every scale). Schedule:
SD's scaled_linear rescaled to zero terminal SNR, v-prediction. Each sample is compared with the exact
probability-flow ODE from the same noise (DPM-Solver++(2M) on 1000 log-SNR-even steps from σ = 1e6, checked
against 500):
- brightness error: mean |per-image brightness − the reference's| / the data's brightness std (0 is perfect);
- RMSE: per-sample root-mean-square of x0 − the reference's, averaged (detail is not traded for brightness);
- W1: of the brightness distribution to the data's.
NFE is counted by wrapping the model (Heun costs two per step). Families, each at 2 to 16 steps:
- fullrange: ddim, euler, heun, dpmpp_2m, unipc × linspace / trailing / Karras and exponential σ ladders from
  σ = 80 (``ZTSNR_SIGMA_MAX``), and the same ladders topped by the latent size (``resolution_sigma_max``);
- diffusers: DDIM, Euler, Heun, DPM++ 2M, UniPC; trailing, and Karras sigmas where the scheduler has them;
- k-diffusion driven as ComfyUI drives a zero-SNR model (``_kdiffusion.py``): euler, heun, dpm_2, lms, dpmpp_2m ×
  "simple", "normal", "karras", and the published Align-Your-Steps ladders (SD 1.5, SDXL).
Prints, per size, the best configuration of each family within 4, 5, 6, 8, 10 and 16 NFE; writes the table as
JSON and a plot. Everything from one run.

    python benchmarks/nfe_frontier.py [--toy flat|images] [--sizes 3x32x32,4x64x64,4x128x128] [--plot nfe.png]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass

import _diffusers_loop
import _kdiffusion
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

import fullrange
from fullrange import metrics, schedules, timesteps, toy
from fullrange.samplers import SAMPLERS
from fullrange.schedules import Schedule

SIZES = {"3x32x32": ((3, 32, 32), 64), "4x64x64": ((4, 64, 64), 32), "4x128x128": ((4, 128, 128), 16)}
BUDGETS = (4, 5, 6, 8, 10, 16)
FULLRANGE = ("ddim", "euler", "heun", "dpmpp_2m", "unipc")
DIFFUSERS = {
    "DDIM": (DDIMScheduler, False),
    "Euler": (EulerDiscreteScheduler, True),
    "Heun": (HeunDiscreteScheduler, True),
    "DPM++ 2M": (DPMSolverMultistepScheduler, True),
    "UniPC": (UniPCMultistepScheduler, True),
}
SCHEDULE = schedules.rescale_zero_terminal_snr(schedules.scaled_linear())
FAMILIES = ("fullrange default", "fullrange", "fullrange, latent-size ladders", "diffusers", "ComfyUI", "ComfyUI AYS")


@dataclass
class Counted:
    """A denoiser that counts its calls: NFE, whatever the sampler's steps are."""

    fn: object
    calls: int = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def reference(denoise, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The exact ODE's x0: DPM-Solver++(2M) on ``num_steps`` steps even in log SNR from σ = 1e6 to 0.01."""
    log_snr = torch.linspace(2 * math.log(100), -2 * math.log(1e6), num_steps, dtype=torch.float64)
    fine = Schedule(torch.cat([torch.sigmoid(log_snr), log_snr.new_zeros(1)]))
    steps = torch.arange(num_steps, -1, -1, dtype=torch.float64)
    return SAMPLERS["dpmpp_2m"](denoise, noise, fine, steps)


def make_data(kind: str, shape: tuple[int, int, int]):
    if kind == "flat":
        return toy.MixtureToy()
    scenes, _ = toy.synthetic_images(16, shape[1], shape[0], seed=7)
    return toy.ImageMixtureToy(scenes.to(torch.float64))


def sweep_steps(family: str, config: str, fn, model, step_counts, max_nfe: int):
    """``(family, config, steps, NFE, x0)`` of ``fn(counted_model, steps)`` for each step count until the NFE exceeds
    ``max_nfe``; a run that raises is a result (x0 ``None``, the error's name in the config)."""
    for steps in step_counts:
        counted = Counted(model)
        try:
            x0 = fn(counted, steps)
        except Exception as error:  # diffusers' Heun at zero SNR, say: a failure is a result here
            yield family, f"{config} ({type(error).__name__})", steps, counted.calls, None
            continue
        if counted.calls > max_nfe:
            return
        yield family, config, steps, counted.calls, x0


def score(family: str, config: str, steps: int, nfe: int, x0, ref: torch.Tensor, data_b: torch.Tensor) -> dict:
    """One row: brightness error (/ the data's brightness std), RMSE to the exact ODE's ``ref``, W1 to the data."""
    finite = x0 is not None and bool(torch.isfinite(x0).all())
    b = metrics.brightness(x0) if finite else None
    return {
        "family": family,
        "config": config,
        "steps": steps,
        "nfe": nfe,
        "error": float((b - metrics.brightness(ref)).abs().mean()) / float(data_b.std()) if finite else math.inf,
        "rmse": float((x0 - ref).flatten(1).pow(2).mean(1).sqrt().mean()) if finite else math.inf,
        "w1": metrics.wasserstein_1d(metrics.brightness(x0), data_b) if finite else math.inf,
    }


def runs(data, noise: torch.Tensor, kd):
    """Every (family, configuration, x0, NFE) with NFE <= 16."""
    num_values = math.prod(noise.shape[1:])
    ladders = {
        "linspace": lambda s: timesteps.plan(SCHEDULE, s, "linspace"),
        "trailing": lambda s: timesteps.plan(SCHEDULE, s, "trailing"),
        "karras σ≤80": lambda s: timesteps.ladder(SCHEDULE, s, "karras"),
        "exponential σ≤80": lambda s: timesteps.ladder(SCHEDULE, s, "exponential"),
        "karras @size": lambda s: timesteps.ladder(SCHEDULE, s, "karras", num_values=num_values),
        "exponential @size": lambda s: timesteps.ladder(SCHEDULE, s, "exponential", num_values=num_values),
    }
    spec = fullrange.SamplingSpec(SCHEDULE, "v_prediction")
    network = _diffusers_loop.as_v_network(data, SCHEDULE)

    def sweep(family, config, fn, model=data.denoise):
        yield from sweep_steps(family, config, fn, model, range(2, 17), max(BUDGETS))

    yield from sweep(
        "fullrange default", "fullrange.sample()", lambda m, s: fullrange.sample(m, noise, spec, steps=s), network
    )
    for name in FULLRANGE:
        for ladder, plan in ladders.items():
            family = "fullrange, latent-size ladders" if "@size" in ladder else "fullrange"
            run = lambda m, s, n=name, p=plan: SAMPLERS[n](m, noise, SCHEDULE, p(s))  # noqa: E731
            yield from sweep(family, f"{name}, {ladder}", run)
    for name, (cls, has_karras) in DIFFUSERS.items():
        for karras in (False, True) if has_karras else (False,):
            config = {"use_karras_sigmas": True} if karras else {}
            label = f"{name}, {'karras' if karras else 'trailing'}"
            run = lambda m, s, c=cls, k=config: _diffusers_loop.run(c, m, noise, s, **k)  # noqa: E731
            yield from sweep("diffusers", label, run, network)
    for name in _kdiffusion.SAMPLERS:
        for scheduler in ("simple", "normal", "karras", *_kdiffusion.AYS):
            family = "ComfyUI AYS" if scheduler in _kdiffusion.AYS else "ComfyUI"

            def comfy(m, s, n=name, sch=scheduler):
                return _kdiffusion.run(kd, _kdiffusion.ComfyModel(SCHEDULE.alphas_cumprod, m), n, sch, noise, s)

            yield from sweep(family, f"{name}, {scheduler}", comfy, network)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", choices=("flat", "images"), default="flat")
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--plot", default=None, help="PNG of the best error per family against NFE")
    parser.add_argument("--json", default=None, help="write every run's numbers here")
    parser.add_argument("--markdown-from", default=None, help="print the README table of a --json file and stop")
    args = parser.parse_args()
    if args.markdown_from:
        with open(args.markdown_from, encoding="utf-8") as f:
            print(markdown(json.load(f)))
        return
    kd = _kdiffusion.load_sampling()
    started = time.perf_counter()
    table: dict[str, dict] = {}
    for size in args.sizes.split(","):
        shape, batch = SIZES[size]
        data = make_data(args.toy, shape)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn((batch, *shape), generator=g, dtype=torch.float64)
        data_b = torch.cat([metrics.brightness(data.sample((64, *shape), g)) for _ in range(8)])
        b_std = float(data_b.std())
        ref = reference(data.denoise, noise, 1000)
        check = reference(data.denoise, noise, 500)
        converged = (
            float((metrics.brightness(check) - metrics.brightness(ref)).abs().mean()) / b_std,
            float((check - ref).flatten(1).pow(2).mean(1).sqrt().mean()),
        )
        rows = [score(*run, ref, data_b) for run in runs(data, noise, kd)]
        table[size] = {"batch": batch, "reference_vs_half_steps": converged, "rows": rows}
        print_size(size, batch, converged, rows)
    print(f"({args.toy} toy; all from this run, {time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=1)
    if args.plot:
        plot(table, args.plot, f"{{size}} ({args.toy} toy)")


def best(rows: list[dict], family: str, budget: int) -> dict | None:
    fits = [r for r in rows if r["family"] == family and r["nfe"] <= budget and math.isfinite(r["error"])]
    return min(fits, key=lambda r: (r["error"], r["rmse"])) if fits else None


def print_size(size: str, batch: int, converged: tuple[float, float], rows: list[dict]) -> None:
    failed = sorted({r["config"] for r in rows if not math.isfinite(r["error"])})
    print(
        f"\n{size}, batch {batch}; reference at 1000 steps against 500: error {converged[0]:.1e}, "
        f"RMSE {converged[1]:.1e}"
    )
    if failed:
        print(f"failed or non-finite at some step count: {', '.join(failed)}")
    print("brightness error / RMSE (best configuration, NFE used) per family within each NFE budget")
    for budget in BUDGETS:
        cells = []
        for family in FAMILIES:
            r = best(rows, family, budget)
            cells.append("—" if r is None else f"{r['error']:.3f} / {r['rmse']:.3f} ({r['config']}, {r['nfe']})")
        print(f"  ≤{budget:>2}: " + " | ".join(f"{f}: {c}" for f, c in zip(FAMILIES, cells, strict=True)))


def markdown(table: dict) -> str:
    """Per size and budget: fullrange's default at exactly that NFE; each peer family's best within it."""
    peers = ("diffusers", "ComfyUI", "fullrange")
    lines = [
        "| size | NFE | fullrange default | best diffusers | best k-diffusion (ComfyUI's way) | fullrange before |",
        "|---|---|---|---|---|---|",
    ]
    for size, entry in table.items():
        for budget in BUDGETS:
            exact = [r for r in entry["rows"] if r["family"] == "fullrange default" and r["nfe"] == budget]
            cells = [f"{exact[0]['error']:.3f} / {exact[0]['rmse']:.3f}" if exact else "—"]
            for family in peers:
                r = best(entry["rows"], family, budget)
                cells.append("—" if r is None else f"{r['error']:.3f} / {r['rmse']:.3f} ({r['config']}, {r['nfe']})")
            lines.append(f"| {size.replace('x', '×')} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    table: dict,
    path: str,
    title: str,
    families: tuple[str, ...] = FAMILIES,
    budgets: tuple[int, ...] = BUDGETS,
    goal: float | None = 0.02,
) -> None:
    """Per size (``title`` formats with it), each family's best brightness error within each NFE budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(5.2 * len(table), 4), squeeze=False, sharey=True)
    for ax, (size, entry) in zip(axes[0], table.items(), strict=True):
        for family in families:
            points = [(b, best(entry["rows"], family, b)) for b in budgets]
            points = [(b, r["error"]) for b, r in points if r is not None]
            if points:
                ax.plot(*zip(*points, strict=True), "o-", label=family, alpha=0.85)
        if goal is not None:
            ax.axhline(goal, color="gray", linestyle=":", label=f"goal {goal:g}")
        ax.set(title=title.format(size=size), xlabel="model evaluations (NFE)", yscale="log")
        ax.set_xticks(budgets)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("brightness error / data std (best per family)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
