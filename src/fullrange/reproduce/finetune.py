"""Guttenberg's experiment: fine-tune a base model on one solid black image, under each recipe."""

from __future__ import annotations

import copy
import json
import statistics

import torch

from .. import batches, metrics, toy
from ..files import write_bytes
from ..plots import pyplot, save_figure
from ..train import train
from .common import NULL_LABEL, Context, sample_labels
from .verdicts import fmt, holds, interval

TARGETS = {"solid black": -1.0}  # Guttenberg's experiment; a white target costs as much again and says the same


def finetune_experiment(ctx: Context) -> dict:
    """Mean brightness of samples for the fine-tuned label against fine-tuning steps, per recipe and seed (each
    seed fine-tunes its own baseline model)."""
    out = ctx.out / "finetune"
    p = ctx.preset
    base_recipe = ctx.recipes["baseline"]
    n = max(4, p.num_samples // 5)
    every = max(1, -(-p.finetune_steps // p.finetune_evals))
    # per seed: curves[target][recipe][step] = brightness
    per_seed: list[dict[str, dict[str, dict[str, float]]]] = []
    for seed in p.seeds:
        config = ctx.train_config(
            steps=p.finetune_steps,
            batch_size=p.finetune_batch_size,
            lr=p.finetune_lr,
            warmup=1,
            checkpoint_every=every,
            ema_decay=0.0,
            seed=seed,
        )
        base = ctx.model("baseline", seed)
        curves: dict[str, dict[str, dict[str, float]]] = {}
        for target, value in TARGETS.items():
            label = toy.LABELS.index(target)
            labels = torch.full((n,), label)
            image = torch.full((1, p.channels, p.size, p.size), value)
            before = _brightness(ctx, base, base_recipe, labels, seed)
            curves[target] = {}
            for name, recipe in ctx.recipes.items():
                run = f"{name}_{target.replace(' ', '_')}/seed_{seed}"
                log_path = out / "curves" / f"{run}.json"
                curve = json.loads(log_path.read_text()) if log_path.exists() else {}
                curve["0"] = before

                def evaluate(step, model, recipe=recipe, curve=curve, log_path=log_path, labels=labels, seed=seed):
                    curve[str(step)] = _brightness(ctx, model, recipe, labels, seed)
                    write_bytes(log_path, json.dumps(curve).encode())

                train(
                    copy.deepcopy(base).requires_grad_(True),
                    batches.labelled(image, torch.tensor([label]), NULL_LABEL, dropout=0.0),
                    recipe,
                    config,
                    out / "models" / run,
                    progress=ctx.progress,
                    description=f"fine-tune {name} on {target}, seed {seed}",
                    on_checkpoint=evaluate,
                )
                curves[target][name] = dict(sorted(curve.items(), key=lambda kv: int(kv[0])))
        per_seed.append(curves)

    first = per_seed[0]
    curves = {
        target: {
            name: {step: interval([c[target][name][step] for c in per_seed]) for step in curve}
            for name, curve in by_recipe.items()
        }
        for target, by_recipe in first.items()
    }
    plt = pyplot()
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(6 * len(TARGETS), 4), sharey=True, squeeze=False)
    markers = "osD^v<>"
    for ax, (target, by_recipe) in zip(axes[0], curves.items(), strict=True):
        for k, (name, curve) in enumerate(by_recipe.items()):
            xs = [int(s) for s in curve]
            ax.plot(xs, [c["mean"] for c in curve.values()], marker=markers[k % len(markers)], label=name)
            ax.fill_between(xs, [c["low"] for c in curve.values()], [c["high"] for c in curve.values()], alpha=0.15)
        goal = (TARGETS[target] + 1) / 2
        ax.axhline(goal, color="gray", linestyle="--", label=f"target ({goal:.0f})")
        ax.set(
            title=f"fine-tuned on one '{target}' image",
            xlabel="fine-tuning steps",
            ylabel=f"mean brightness of samples (0-1); band: {len(p.seeds)} seeds",
            ylim=(-0.02, 1.02),
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    plot = save_figure(fig, out / "finetune_brightness.png")

    final = {
        target: {name: [list(c[target][name].values())[-1] for c in per_seed] for name in by_recipe}
        for target, by_recipe in first.items()
    }
    black = final["solid black"]  # the target is 0: the brightness is the distance to it
    fixes = [name for name in black if name != "baseline"]
    findings = []
    if "baseline" in black and fixes:
        best = min(fixes, key=lambda name: statistics.fmean(black[name]))
        per = [b > 0.15 and black[best][i] < 0.1 for i, b in enumerate(black["baseline"])]
        findings.append(
            {
                "claim": f"Fine-tuned on one solid black image for {p.finetune_steps} steps, the SD recipe still "
                "cannot make it; a fix can (Guttenberg 2023)",
                "verdict": holds(per, statistics.fmean(black[best]) < statistics.fmean(black["baseline"])),
                "evidence": "brightness of 'solid black' samples after fine-tuning (target 0): "
                + ", ".join(f"{k} {fmt(v)}" for k, v in black.items()),
                "rule": f"in every seed the baseline stays above 0.15 and the best fix ({best}) gets below 0.1",
            }
        )
    numbers = {"curves": curves, "final": {t: {k: interval(v) for k, v in by.items()} for t, by in final.items()}}
    return {"numbers": numbers, "plots": [plot], "findings": findings}


def _brightness(ctx: Context, model, recipe, labels, seed: int) -> float:
    return float(metrics.brightness(sample_labels(ctx, model, recipe, labels, seed=seed + 1).clamp(-1, 1)).mean())
