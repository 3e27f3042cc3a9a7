"""The defaults of ``benchmarks/nfe_frontier.py`` on trained networks: the zero-terminal-SNR models of
``fullrange reproduce`` (3×16×16 images; trained here, or resumed from ``--out``'s checkpoints).

For each model, samples for balanced labels with guidance 1 at 4, 6 and 8 model evaluations, and the W1 distance
of their brightness (clamped to [-1, 1]) to the data's, for: what ``fullrange.sample`` picks, UniPC and DDIM on
trailing steps (the reproduction's own), and UniPC on a Karras ladder from σ = 80. Everything from one run.

    python benchmarks/nfe_trained.py [--out fullrange-report] [--preset quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fullrange import metrics, sample
from fullrange.reproduce.common import PRESETS, Context, balanced_labels
from fullrange.timesteps import ladder

CONFIGS = {
    "fullrange.sample() default": {},
    "unipc, trailing": {"sampler": "unipc", "spacing": "trailing"},
    "ddim, trailing": {"sampler": "ddim", "spacing": "trailing"},
    "unipc, karras σ≤80": {"sampler": "unipc", "ladder": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("fullrange-report"))
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    parser.add_argument("--seeds", type=int, default=3, help="noise seeds per configuration")
    args = parser.parse_args()
    started = time.perf_counter()
    ctx = Context(args.out, PRESETS[args.preset], progress=False)
    images, _ = ctx.data
    data_b = metrics.brightness(images)
    labels = balanced_labels(ctx.preset.num_samples)
    print(f"W1 of sample brightness to the data's ({ctx.preset.num_samples} samples × {args.seeds} seeds, mean ± std)")
    for name in ("ztsnr",):
        recipe, model = ctx.recipes[name], ctx.model(name)
        print(f"model {name!r} ({recipe.spec.prediction}, zero terminal SNR)")
        print(f"{'configuration':<30}" + "".join(f"{n:>16}" for n in (4, 6, 8)))
        for config, options in CONFIGS.items():
            cells = []
            for steps in (4, 6, 8):
                w1 = []
                for seed in range(args.seeds):
                    g = torch.Generator().manual_seed(seed)
                    p = ctx.preset
                    noise = torch.randn(len(labels), p.channels, p.size, p.size, generator=g)
                    opts = dict(options)
                    plan = steps
                    if opts.pop("ladder", False):
                        plan = ladder(recipe.spec.schedule, steps, "karras")
                    out = sample(model, noise, recipe.spec, steps=plan, cond={"class_labels": labels}, **opts)
                    w1.append(metrics.wasserstein_1d(metrics.brightness(out.clamp(-1, 1)), data_b))
                w1 = torch.tensor(w1)
                cells.append(f"{w1.mean():.3f} ± {w1.std():.3f}")
            print(f"{config:<30}" + "".join(f"{c:>16}" for c in cells))
    print(f"(all from this run, {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
