"""Brightness-spread ratio per sampler and step count, fullrange beside diffusers, on the mixture toy.

Data: ``fullrange.toy.MixtureToy`` (flat images from near-black to near-white plus pixel noise) at 3×32×32,
with its exact denoiser standing in for a network. Schedule: SD scaled_linear rescaled to zero terminal
SNR, v-prediction, trailing steps (Lin et al.'s recipe), and our Karras ladder for three samplers. The
ratio is the std of per-image mean brightness of the samples over that of the data: the exact
probability-flow ODE gives 1.0. Everything from one run.

    python benchmarks/brightness_per_nfe.py [--batch 256] [--resolution 32]
"""

from __future__ import annotations

import argparse

import _diffusers_loop
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

from fullrange import metrics, schedules, timesteps, toy
from fullrange.samplers import SAMPLERS

STEPS = (5, 10, 25, 50)
DIFFUSERS = {
    "DDIM": DDIMScheduler,
    "Euler": EulerDiscreteScheduler,
    "DPM++ 2M": DPMSolverMultistepScheduler,
    "UniPC": UniPCMultistepScheduler,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    data = toy.MixtureToy()
    shape = (args.batch, 3, args.resolution, args.resolution)
    g = torch.Generator().manual_seed(0)
    reference = data.sample(shape, g)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    schedule = schedules.rescale_zero_terminal_snr(schedules.scaled_linear())

    network = _diffusers_loop.as_v_network(data, schedule)
    rows = {}
    for name, fn in SAMPLERS.items():
        rows[f"fullrange {name}"] = [
            metrics.spread_ratio(
                fn(
                    data.denoise,
                    noise,
                    schedule,
                    timesteps.spaced(1000, s, "trailing"),
                    generator=torch.Generator().manual_seed(1),
                ),
                reference,
            )
            for s in STEPS
        ]
    for name in ("ddim", "dpmpp_2m", "unipc"):
        rows[f"fullrange {name} karras"] = [
            metrics.spread_ratio(
                SAMPLERS[name](data.denoise, noise, schedule, timesteps.ladder(schedule, s)), reference
            )
            for s in STEPS
        ]
    for name, cls in DIFFUSERS.items():
        rows[f"diffusers {name}"] = [
            metrics.spread_ratio(_diffusers_loop.run(cls, network, noise, s), reference) for s in STEPS
        ]
    baseline = metrics.spread_ratio(
        SAMPLERS["ddim"](data.denoise, noise, schedules.scaled_linear(), timesteps.spaced(1000, 50, "leading", 1)),
        reference,
    )
    print(f"brightness spread ratio (samples / data; exact ODE = 1.0), mixture toy {shape[1:]}, batch {args.batch},")
    print("zero terminal SNR + v + trailing steps ('karras': σ = ∞ then a Karras ladder from ZTSNR_SIGMA_MAX);")
    print("columns are sampler steps (heun makes 2 model calls per step)")
    print(f"{'sampler':<26}" + "".join(f"{s:>8}" for s in STEPS))
    for name, ratios in rows.items():
        print(f"{name:<26}" + "".join(f"{r:>8.3f}" for r in ratios))
    print(f"for contrast, SD schedule + leading + DDIM at 50 steps: {baseline:.3f}")


if __name__ == "__main__":
    main()
