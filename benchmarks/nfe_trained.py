"""The sampling defaults on trained networks: the zero-terminal-SNR models of ``fullrange reproduce`` (3×16×16
images; one per seed, trained here or resumed from ``--out``'s checkpoints).

1. Few steps. For each model, samples for balanced labels with guidance 1 at 4, 6 and 8 steps, and the W1 distance
   of their brightness (clamped to [-1, 1]) to the data's, for what ``fullrange.sample`` picks and for each sampler
   on trailing steps and on the σ ladders topped by the latent size. ``--larger``: instead one model of 3×32×32
   images, trained longer (``LARGER``).

2. Guidance. At w = 3 and 7.5, with the reproduction's own sampling (DDIM, trailing, 25 steps): pixels beyond ±1
   before clipping (the data has none) and W1, for plain CFG, Lin et al.'s rescale and the shapings of
   ``fullrange.guidance`` alone and with the rescale.

Each cell is the mean over the model seeds with the lowest and highest seed in brackets; each seed samples its own
noise. Everything from one run.

``--recipe flow``: the rectified-flow models instead (the reproduction's ``flow`` recipe, shift 1), few steps only,
with the time shifts of ``benchmarks/flow_frontier.py``: the model's own (1), SD3's 3, the latent-size shift
``k = 2√D/(S-1)`` and the latent-size ladder.

    python benchmarks/nfe_trained.py [--out fullrange-report] [--preset quick] [--only steps|guidance] [--larger]
        [--recipe ztsnr|flow]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from fullrange import metrics, sample
from fullrange.guidance import Shaping
from fullrange.reproduce.common import NULL_LABEL, PRESETS, Context, balanced_labels
from fullrange.schedules import with_shift
from fullrange.timesteps import resolution_sigma_max

STEPS = (4, 6, 8)
LARGER = {"name": "larger", "size": 32, "train_steps": 600, "seeds": (0,)}
"""``--larger``: 3×32×32 images (D = 3072), trained 600 steps (3× the quick preset's); one seed."""
SAMPLERS = {
    "fullrange.sample() default": {},
    **{f"{s}, trailing": {"sampler": s, "spacing": "trailing"} for s in ("ddim", "euler", "dpmpp_2m", "unipc")},
    **{f"{s}, latent-size karras": {"sampler": s, "spacing": "karras"} for s in ("ddim", "dpmpp_2m", "unipc")},
    "unipc, latent-size exponential": {"sampler": "unipc", "spacing": "exponential"},
}
FLOW_SAMPLERS = {
    "fullrange.sample() default (ddim, trailing, shift 1)": {},
    **{f"{s}, trailing, shift 3": {"sampler": s, "spacing": "trailing", "shift": 3.0} for s in ("ddim", "unipc")},
    **{f"{s}, latent-size shift": {"sampler": s, "spacing": "trailing", "shift": "size"} for s in ("ddim", "unipc")},
    **{f"{s}, latent-size karras": {"sampler": s, "spacing": "karras"} for s in ("ddim", "dpmpp_2m", "unipc")},
}
"""Flow models: the shifts of benchmarks/flow_frontier.py; "size" is ``2 sqrt(D) / (S - 1)``."""
SCALES = (3.0, 7.5)
GUIDANCE = {
    "CFG": (0.0, Shaping()),
    "rescale φ=0.7": (0.7, Shaping()),
    "CFG-Zero*": (0.0, Shaping(zero_star=True)),
    "CFG-Zero* + rescale 0.7": (0.7, Shaping(zero_star=True)),
    "interval (0.28, 5.42]": (0.0, Shaping(interval=(0.28, 5.42))),
    "interval + rescale 0.7": (0.7, Shaping(interval=(0.28, 5.42))),
    "FDG low=1": (0.0, Shaping(low_scale=1.0)),
    "FDG low=1 + rescale 0.7": (0.7, Shaping(low_scale=1.0)),
}


def cell(values: list[float]) -> str:
    v = torch.tensor(values)
    return f"{v.mean():.3f} ({v.min():.3f}–{v.max():.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("fullrange-report"))
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    parser.add_argument("--only", choices=("steps", "guidance"), default=None)
    parser.add_argument("--larger", action="store_true", help="instead, one larger model (LARGER)")
    parser.add_argument("--recipe", choices=("ztsnr", "flow"), default="ztsnr")
    args = parser.parse_args()
    if args.recipe == "flow" and args.only == "guidance":
        parser.error("--recipe flow measures few steps only")
    started = time.perf_counter()
    preset = replace(PRESETS[args.preset], **LARGER) if args.larger else PRESETS[args.preset]
    ctx = Context(args.out / "larger" if args.larger else args.out, preset, progress=False)
    p = ctx.preset
    images, _ = ctx.data
    data_b = metrics.brightness(images)
    labels = balanced_labels(p.num_samples)
    recipe = ctx.recipes[args.recipe]
    models = {seed: ctx.model(args.recipe, seed) for seed in p.seeds}
    trained = time.perf_counter()
    print(
        f"{args.recipe} models of the {p.name} preset, seeds {list(p.seeds)} ({trained - started:.0f} s to load "
        f"or train); {p.num_samples} samples per seed, balanced labels"
    )

    def run(seed: int, shift: float | str | None = None, **kwargs) -> torch.Tensor:
        noise = torch.randn(len(labels), p.channels, p.size, p.size, generator=torch.Generator().manual_seed(seed + 1))
        cond = {"class_labels": labels}
        uncond = {"class_labels": torch.full_like(labels, NULL_LABEL)}
        spec = recipe.spec
        if shift is not None:  # a flow model sampled with another time shift
            if shift == "size":
                shift = resolution_sigma_max(p.channels * p.size * p.size) / (kwargs["steps"] - 1)
            spec = replace(spec, schedule=with_shift(spec.schedule, shift))
        return sample(models[seed], noise, spec, cond=cond, uncond=uncond, **kwargs)

    def w1(samples: torch.Tensor) -> float:
        return metrics.wasserstein_1d(metrics.brightness(samples.clamp(-1, 1)), data_b)

    if args.only in (None, "steps"):
        print("\nW1 of the samples' brightness to the data's, guidance 1")
        print(f"| configuration | {' | '.join(f'{n} steps' for n in STEPS)} |\n|---|{'---|' * len(STEPS)}")
        table = {}
        for name, options in (FLOW_SAMPLERS if args.recipe == "flow" else SAMPLERS).items():
            table[name] = [[w1(run(seed, steps=n, **options)) for seed in p.seeds] for n in STEPS]
            print(f"| {name} | {' | '.join(cell(v) for v in table[name])} |")
        if args.recipe == "ztsnr":
            default, ddim = table["fullrange.sample() default"], table["ddim, trailing"]
            pairs = zip(STEPS, default, ddim, strict=True)
            gaps = [f"{n}: {sum(a) / len(a) - sum(b) / len(b):+.4f}" for n, a, b in pairs]
            print(f"default minus trailing DDIM, mean W1 over seeds, by steps: {', '.join(gaps)}")
    if args.only in (None, "guidance"):
        print(f"\nguidance, DDIM on {p.sample_steps} trailing steps: pixels beyond ±1 / W1")
        print(f"| method | {' | '.join(f'w = {w:g}' for w in SCALES)} |\n|---|{'---|' * len(SCALES)}")
        plain = [run(seed, sampler="ddim", steps=p.sample_steps) for seed in p.seeds]
        both = cell([metrics.saturation(s, 1.0) for s in plain]) + " / " + cell([w1(s) for s in plain])
        print(f"| w = 1 | {' | '.join([both] * len(SCALES))} |")
        for name, (phi, shaping) in GUIDANCE.items():
            cells = []
            for w in SCALES:
                out = [
                    run(
                        seed,
                        sampler="ddim",
                        steps=p.sample_steps,
                        guidance_scale=w,
                        guidance_rescale=phi,
                        shaping=shaping,
                    )
                    for seed in p.seeds
                ]
                cells.append(cell([metrics.saturation(s, 1.0) for s in out]) + " / " + cell([w1(s) for s in out]))
            print(f"| {name} | {' | '.join(cells)} |")
    print(f"\n(all from this run, {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
