"""How long to hold the tone of a model that leaks nothing: ``fullrange.leak.RELEASE`` on trained models.

The zero-terminal-SNR models of ``fullrange reproduce`` (3×16×16, one per seed, trained here or resumed from
``--out``'s checkpoints) are asked for "solid black" with a white tone and for "solid white" with a black one,
sampled as the reproduction samples (DDIM, 25 trailing steps), for each release scale: the tone replaces the lowest
3×3 frequencies of the model's x0 predictions while σ >= release·sqrt(C·H·W). Prints, per seed, the mean brightness
untoned and toned, the share of the way to the brightness asked for, and the pixels beyond ±1 before clipping.
Everything from one run.

    python benchmarks/tone_release.py [--out fullrange-report] [--samples 60]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fullrange import leak, metrics, toy
from fullrange.reproduce.common import PRESETS, Context, sample_labels

RELEASES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
ASKS = {"solid black": (1.0, 1.0), "solid white": (-1.0, 0.0)}  # label: (tone, brightness it asks for)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("fullrange-report"))
    parser.add_argument("--samples", type=int, default=60, help="samples per label and seed")
    args = parser.parse_args()
    started = time.perf_counter()
    ctx = Context(args.out, PRESETS["quick"], progress=False)
    recipe, chosen = ctx.recipes["ztsnr"], leak.RELEASE
    print("| release | " + " | ".join(f"{label}, seed {s}" for label in ASKS for s in ctx.preset.seeds) + " |")
    print("|---|" + "---|" * len(ASKS) * len(ctx.preset.seeds))
    try:
        for release in RELEASES:
            leak.RELEASE = release
            cells = []
            for label, (tone, target) in ASKS.items():
                labels = torch.full((args.samples,), toy.LABELS.index(label))
                for seed in ctx.preset.seeds:
                    model = ctx.model("ztsnr", seed)
                    plain = sample_labels(ctx, model, recipe, labels, seed=seed + 1).clamp(-1, 1)
                    toned = sample_labels(ctx, model, recipe, labels, leak=torch.tensor(tone), seed=seed + 1)
                    before = float(metrics.brightness(plain).mean())
                    after = float(metrics.brightness(toned.clamp(-1, 1)).mean())
                    moved = (after - before) / (target - before)
                    cells.append(f"{before:.3f} → {after:.3f} ({moved:.0%}; ±1: {metrics.saturation(toned, 1.0):.3f})")
            print(f"| 1/{round(1 / release)} | " + " | ".join(cells) + " |", flush=True)
    finally:
        leak.RELEASE = chosen
    print(f"(all from this run, {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
