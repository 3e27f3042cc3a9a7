"""Requested against achieved mean brightness with a tone, on the exact mixture denoiser.

Data: ``fullrange.toy.MixtureToy`` with 21 flat levels from black to white (pixel noise 0.1), so every brightness
in [0, 1] is in the data; its exact denoiser stands in for a model trained on SD's schedule (scaled_linear, no
zero terminal SNR: the leak-aware start, from the flat leak L = 2b - 1 at its actual first step, leading (SD's
default, + 1) and trailing) and on its zero-terminal-SNR rescaling (nothing leaks: the tone replaces the low band
of the predictions while σ is high, ``fullrange.leak.steer``; trailing steps and fullrange's default Karras ladder).
The achieved brightness is the mean of the samples (clipped to [-1, 1], then to 0-1), and the spread is the std of
the per-image brightness around it: how closely one image follows its request. The same noise for every row.
Everything from one run.

    python benchmarks/leak_calibration.py [--batch 32] [--steps 25] [--plot leak_calibration.png]
"""

from __future__ import annotations

import argparse
import itertools

import torch

import fullrange
from fullrange import metrics, toy
from fullrange.sampling import STABLE_DIFFUSION, ZERO_TERMINAL_SNR, SamplingSpec

REQUESTED = [round(0.05 * i, 2) for i in range(21)]
SHAPES = {"3×32×32": (3, 32, 32), "4×64×64 (SD latent)": (4, 64, 64)}
RUNS = {
    "SD, leading": (STABLE_DIFFUSION, "leading"),
    "SD, trailing": (STABLE_DIFFUSION, "trailing"),
    "zero SNR, trailing": (ZERO_TERMINAL_SNR, "trailing"),
    "zero SNR, karras": (ZERO_TERMINAL_SNR, "karras"),
}


def network(data, schedule):
    """The exact denoiser as an x0-predicting network."""

    def model(x, t):
        return data.denoise(x, float(t[0]), float(schedule.alphas_cumprod_at(float(t[0]))))

    return model


def achieved(model, spec, spacing, noise, steps, requested):
    """(mean, std) of the per-image brightness without a tone, then for each requested brightness."""
    out = []
    for b in [None, *requested]:
        leak = None if b is None else torch.tensor(2 * b - 1.0, dtype=noise.dtype)
        x0 = fullrange.sample(model, noise, spec, sampler="dpmpp_2m", steps=steps, spacing=spacing, leak=leak)
        per_image = metrics.brightness(x0.clamp(-1, 1))
        out.append((float(per_image.mean()), float(per_image.std())))
    return out[0], out[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--plot", default=None, help="Also write the calibration plot here (PNG).")
    args = parser.parse_args()
    data = toy.MixtureToy(levels=tuple(torch.linspace(-1, 1, 21).tolist()), pixel_std=0.1)
    results = {}
    for shape_name, shape in SHAPES.items():
        noise = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for run, (base, spacing) in RUNS.items():
            own = "trailing" if spacing == "karras" else spacing  # a spec's own spacing is never a ladder
            spec = SamplingSpec(base.schedule, "sample", own, base.steps_offset)
            second = spec.plan(args.steps, spacing, num_values=noise[0].numel())[:2]
            # √ᾱ at the first step (what the start leaks), or at zero SNR at the second (what the first step carries)
            t = float(second[1] if base is ZERO_TERMINAL_SNR else second[0])
            alpha = float(spec.schedule.alphas_cumprod_at(t)) ** 0.5
            model = network(data, spec.schedule)
            plain, got = achieved(model, spec, spacing, noise, args.steps, REQUESTED)
            results[(shape_name, run)] = (round(t), alpha, plain, got)
            print(f"{shape_name}, {run}: done", flush=True)

    print(
        f"\nSD schedule, dpmpp_2m, {args.steps} steps, {args.batch} samples per row; achieved brightness, mean "
        "(std of the per-image brightness)\n"
    )
    header = "| requested | " + " | ".join(f"{s}, {p} (t = {results[(s, p)][0]})" for s, p in results) + " |"
    print(header)
    print("|" + "---|" * (len(results) + 1))
    print("| no leak | " + " | ".join(f"{v[2][0]:.3f} ({v[2][1]:.3f})" for v in results.values()) + " |")
    for i, b in enumerate(REQUESTED):
        print(f"| {b:.2f} | " + " | ".join(f"{v[3][i][0]:.3f} ({v[3][i][1]:.3f})" for v in results.values()) + " |")
    means = {k: [m for m, _ in v[3]] for k, v in results.items()}
    errors = {k: sum(abs(a - b) for a, b in zip(m, REQUESTED, strict=True)) / len(REQUESTED) for k, m in means.items()}
    inner = [i for i, b in enumerate(REQUESTED) if 0.1 <= b <= 0.9]
    inner_errors = {k: sum(abs(m[i] - REQUESTED[i]) for i in inner) / len(inner) for k, m in means.items()}
    spreads = {k: sum(s for _, s in v[3]) / len(REQUESTED) for k, v in results.items()}
    print("| mean abs error | " + " | ".join(f"{e:.3f}" for e in errors.values()) + " |")
    print("| mean abs error, 0.1-0.9 | " + " | ".join(f"{e:.3f}" for e in inner_errors.values()) + " |")
    print("| mean per-image std | " + " | ".join(f"{e:.3f}" for e in spreads.values()) + " |")
    alphas = " | ".join(f"{v[1]:.3f}" for v in results.values())
    print(f"| √ᾱ at t (the first step; at zero SNR the second) | {alphas} |")
    monotonic = {k: all(a < b for a, b in itertools.pairwise(m)) for k, m in means.items()}
    print("| monotonic | " + " | ".join("yes" if m else "no" for m in monotonic.values()) + " |")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="achieved = requested")
        for (shape_name, spacing), (_, _, _, got) in results.items():
            mean = torch.tensor([m for m, _ in got])
            std = torch.tensor([s for _, s in got])
            (line,) = ax.plot(REQUESTED, mean, "o-", markersize=3, label=f"{shape_name}, {spacing}")
            ax.fill_between(REQUESTED, mean - std, mean + std, color=line.get_color(), alpha=0.12, linewidth=0)
        ax.axhline(0.5, color="lightgray", linewidth=0.8)
        ax.set(
            xlabel="requested brightness (leak)",
            ylabel="achieved mean brightness",
            title=f"Leak-aware start, exact denoiser, SD schedule, {args.steps} steps\n(band: ± std per image)",
            xlim=(0, 1),
            ylim=(0, 1),
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
