"""Brightness error per model evaluation (NFE) for rectified-flow models: which time shift keeps the brightness.

The model is the exact denoiser of ``fullrange.toy.MixtureToy`` (seven flat brightness levels + pixel noise 0.2)
seen as a rectified-flow model (``fullrange.schedules.rectified_flow``, flow prediction), so every error is the
sampler's and its steps'. Each sample is compared with the exact probability-flow ODE from the same noise (the
reference of ``nfe_frontier.py``: the ODE does not depend on the coordinates). Metrics as there: brightness error
(mean |brightness − reference's| / data brightness std), RMSE to the reference, W1 to the data's brightness.

Shifts compared, each with fullrange's ddim (= flow-matching Euler), euler, heun, dpmpp_2m and unipc on trailing
flow steps (``tau = 1 - k/S``, shifted):
- none (k = 1); SD3's fixed 3 (kohya, diffusers' SD3 default);
- the resolution rule ``k = 3 sqrt(D / D_1024)`` (SD3's 3 at its 1024² latents, 16×128×128, scaled by the rule);
- Flux's μ for the image's 2×2-patch sequence (``k = exp(μ)``);
- the latent-size shift: ``k = 2 sqrt(D) / (S - 1)``, which puts the first step after t = T at σ = 2·sqrt(D)
  (``resolution_sigma_max``): fullrange's ladder top written as a shift, for S trailing steps;
- fullrange's latent-size ladder: a Karras σ ladder from t = T topped at ``resolution_sigma_max`` (2·sqrt(D)).
Peers: diffusers' flow schedulers as pipelines drive them: FlowMatchEuler as SD3's pipeline (shift 3, its default
steps) and as Flux's (sigmas ``linspace(1, 1/S, S)``, dynamic μ); FlowMatchHeun (shift 3); UniPC and DPM++ 2M with
``use_flow_sigmas`` (SANA's way, flow_shift 3).

    python benchmarks/flow_frontier.py [--sizes 3x32x32,4x64x64,16x64x64] [--plot flow.png] [--json flow.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from nfe_frontier import best, plot, reference, score, sweep_steps

from fullrange import metrics, prediction, schedules, timesteps, toy
from fullrange.samplers import SAMPLERS

SIZES = {"3x32x32": ((3, 32, 32), 64), "4x64x64": ((4, 64, 64), 32), "16x64x64": ((16, 64, 64), 16)}
BUDGETS = (4, 6, 8, 10, 16)
STEPS = (2, 3, 4, 5, 6, 8, 10, 16)
SAMPLER_NAMES = ("ddim", "euler", "heun", "dpmpp_2m", "unipc")
SD3_LATENT_1024 = 16 * 128 * 128
FAMILIES = ("none", "SD3 fixed 3", "resolution rule", "Flux μ", "latent-size shift", "latent-size ladder", "diffusers")


def shifts(shape: tuple[int, int, int]) -> dict[str, float]:
    num_values = math.prod(shape)
    return {
        "none": 1.0,
        "SD3 fixed 3": 3.0,
        "resolution rule": schedules.resolution_shift(num_values, SD3_LATENT_1024, base_shift=3.0),
        "Flux μ": schedules.flux_shift((shape[1] // 2) * (shape[2] // 2)),
    }


def latent_size_shift(num_values: int, num_steps: int) -> float:
    """The shift whose second trailing step (tau = 1 - 1/S, sigma = S - 1 unshifted) is at resolution_sigma_max."""
    return timesteps.resolution_sigma_max(num_values) / max(num_steps - 1, 1)


def velocity_network(data, flow: schedules.RectifiedFlow):
    """The exact denoiser as a flow network ``net(x_flow, t)`` returning ``u = eps - x0``."""

    def net(x: torch.Tensor, t) -> torch.Tensor:
        t = float(torch.as_tensor(t).flatten()[0])
        ac = float(flow.alphas_cumprod_at(t))
        x_vp = prediction.from_flow_input(x, ac)
        return prediction.from_x0("flow", data.denoise(x_vp, t, ac), x_vp, ac)

    return net


def diffusers_run(scheduler, net, noise: torch.Tensor, **plan) -> torch.Tensor:
    scheduler.set_timesteps(**plan)
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t), t, x).prev_sample
    return x


def runs(data, noise: torch.Tensor):
    """Every (family, configuration, steps, NFE, x0)."""
    shape = tuple(noise.shape[1:])
    flow = schedules.rectified_flow()
    net = velocity_network(data, flow)
    seq_len = (shape[1] // 2) * (shape[2] // 2)
    mu = schedules.flux_mu(seq_len)

    def sweep(family, config, fn, model=data.denoise):
        yield from sweep_steps(family, config, fn, model, STEPS, max(BUDGETS))

    for family, k in shifts(shape).items():
        shifted = schedules.with_shift(flow, k)
        for name in SAMPLER_NAMES:
            run = lambda m, s, n=name, f=shifted: SAMPLERS[n](m, noise, f, timesteps.plan(f, s))  # noqa: E731
            yield from sweep(family, f"{name}, k = {k:.2f}", run)
    for name in SAMPLER_NAMES:

        def at_size(m, s, n=name):
            k = latent_size_shift(math.prod(shape), s)
            return SAMPLERS[n](m, noise, flow, timesteps.flow_steps(flow, s, shift=k))

        yield from sweep("latent-size shift", f"{name}, k = 2√D/(S-1)", at_size)
        ladder = lambda m, s, n=name: SAMPLERS[n](  # noqa: E731
            m, noise, flow, timesteps.plan(flow, s, "karras", num_values=math.prod(shape))
        )
        yield from sweep("latent-size ladder", f"{name}, karras @size", ladder)
    peers = {
        "FlowMatchEuler, SD3 pipeline (shift 3)": lambda m, s: diffusers_run(
            FlowMatchEulerDiscreteScheduler(shift=3.0), m, noise, num_inference_steps=s
        ),
        f"FlowMatchEuler, Flux pipeline (μ = {mu:.2f})": lambda m, s: diffusers_run(
            FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
            m,
            noise,
            sigmas=torch.linspace(1, 1 / s, s).tolist(),
            mu=mu,
        ),
        "FlowMatchHeun (shift 3)": lambda m, s: diffusers_run(
            FlowMatchHeunDiscreteScheduler(shift=3.0), m, noise, num_inference_steps=s
        ),
    }
    for name, cls in (("UniPC", UniPCMultistepScheduler), ("DPM++ 2M", DPMSolverMultistepScheduler)):
        config = {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"}
        peers[f"{name}, flow sigmas (shift 3)"] = lambda m, s, c=cls, kw=config: diffusers_run(
            c(**kw), m, noise, num_inference_steps=s
        )
    for config, fn in peers.items():
        yield from sweep("diffusers", config, fn, net)


def markdown(table: dict) -> str:
    """Per size and budget, each family's best configuration within it: brightness error / RMSE."""
    lines = ["| size | NFE | " + " | ".join(FAMILIES) + " |", "|---|---|" + "---|" * len(FAMILIES)]
    for size, entry in table.items():
        for budget in BUDGETS:
            cells = []
            for family in FAMILIES:
                r = best(entry["rows"], family, budget)
                cells.append("—" if r is None else f"{r['error']:.3f} / {r['rmse']:.3f} ({r['config']}, {r['nfe']})")
            lines.append(f"| {size.replace('x', '×')} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--plot", default=None, help="PNG of the best error per family against NFE")
    parser.add_argument("--json", default=None, help="write every run's numbers here")
    parser.add_argument("--markdown-from", default=None, help="print the README table of a --json file and stop")
    args = parser.parse_args()
    if args.markdown_from:
        with open(args.markdown_from, encoding="utf-8") as f:
            print(markdown(json.load(f)))
        return
    started = time.perf_counter()
    data = toy.MixtureToy()
    table: dict[str, dict] = {}
    for size in args.sizes.split(","):
        shape, batch = SIZES[size]
        g = torch.Generator().manual_seed(0)
        noise = torch.randn((batch, *shape), generator=g, dtype=torch.float64)
        data_b = torch.cat([metrics.brightness(data.sample((64, *shape), g)) for _ in range(8)])
        ref = reference(data.denoise, noise, 1000)
        rows = [score(*run, ref, data_b) for run in runs(data, noise)]
        table[size] = {"batch": batch, "shifts": shifts(shape), "rows": rows}
        print(f"\n{size}, batch {batch}, shifts {', '.join(f'{k} {v:.3f}' for k, v in shifts(shape).items())}")
        failed = sorted({r["config"] for r in rows if not math.isfinite(r["error"])})
        if failed:
            print(f"failed or non-finite at some step count: {', '.join(failed)}")
        print(markdown({size: table[size]}))
    print(f"(flat toy, rectified flow; all from this run, {time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=1)
    if args.plot:
        plot(table, args.plot, "{size}, rectified flow (flat toy)", FAMILIES, BUDGETS, goal=None)


if __name__ == "__main__":
    main()
