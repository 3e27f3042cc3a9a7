"""Per-step overhead of ``fullrange.sample`` against the equivalent diffusers scheduler loop.

The model is nearly free (``0.1 · x`` on one 4×64×64 latent) so the time per step is the samplers' own
bookkeeping. Both loops use the same schedule, prediction type, spacing and steps; prints µs per step
and the ratio ours / diffusers, all measured in this run.

    python benchmarks/sampler_overhead.py [--steps 50] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import _diffusers_loop
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

import fullrange
from fullrange import schedules

PAIRS = {"euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}


def model(x, t):
    return 0.1 * x


def ours(name, noise, schedule, steps):
    spec = fullrange.SamplingSpec(schedule, "v_prediction", "trailing")
    return fullrange.sample(model, noise, spec, sampler=name, steps=steps)


def per_step_us(fn, steps: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    schedule = schedules.rescale_zero_terminal_snr(schedules.scaled_linear())
    noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    print(
        f"per-step time, {args.steps} trailing steps, zero terminal SNR, v-prediction, 1x4x64x64, best of "
        f"{args.repeats}, 1 thread, torch {torch.__version__}"
    )
    print(f"{'sampler':<10} {'fullrange µs':>13} {'diffusers µs':>13} {'ratio':>7}")
    for name, cls in PAIRS.items():
        a = per_step_us(lambda name=name: ours(name, noise, schedule, args.steps), args.steps, args.repeats)
        b = per_step_us(lambda cls=cls: _diffusers_loop.run(cls, model, noise, args.steps), args.steps, args.repeats)
        print(f"{name:<10} {a:>13.1f} {b:>13.1f} {a / b:>7.2f}")


if __name__ == "__main__":
    main()
