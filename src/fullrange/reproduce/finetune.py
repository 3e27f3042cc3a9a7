"""Seed 000's experiment: fine-tune a base model on one solid black (or white) image, under each recipe."""

from __future__ import annotations

import copy
import json

import torch

from .. import batches, metrics, toy
from ..train import train
from .common import NULL_LABEL, Context, generate, pyplot, save_figure

TARGETS = {"solid black": -1.0, "solid white": 1.0}


def finetune(ctx: Context) -> dict:
    """Mean brightness of samples for the fine-tuned label against fine-tuning steps, per recipe."""
    out = ctx.out / "finetune"
    p = ctx.preset
    base_recipe = ctx.recipes["baseline"]
    base = ctx.model("baseline")
    n = max(4, p.num_samples // 5)
    every = max(1, -(-p.finetune_steps // p.finetune_evals))
    config = ctx.train_config(steps=p.finetune_steps, lr=p.finetune_lr, warmup=1, checkpoint_every=every, ema_decay=0.0)
    curves: dict[str, dict[str, dict[str, float]]] = {}
    for target, value in TARGETS.items():
        label = toy.LABELS.index(target)
        labels = torch.full((n,), label)
        image = torch.full((1, p.channels, p.size, p.size), value)
        before = float(metrics.brightness(generate(ctx, base, base_recipe, labels).clamp(-1, 1)).mean())
        curves[target] = {}
        for name, recipe in ctx.recipes.items():
            log_path = out / f"{name}_{target.replace(' ', '_')}.json"
            curve = json.loads(log_path.read_text()) if log_path.exists() else {}
            curve["0"] = before

            def evaluate(step, model, recipe=recipe, curve=curve, log_path=log_path, labels=labels):
                curve[str(step)] = float(metrics.brightness(generate(ctx, model, recipe, labels).clamp(-1, 1)).mean())
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log_path.write_text(json.dumps(curve))

            train(
                copy.deepcopy(base).requires_grad_(True),
                batches.labelled(image, torch.tensor([label]), NULL_LABEL, dropout=0.0),
                recipe,
                config,
                out / "models" / f"{name}_{target.replace(' ', '_')}",
                progress=ctx.progress,
                description=f"fine-tune {name} on {target}",
                on_checkpoint=evaluate,
            )
            curves[target][name] = dict(sorted(curve.items(), key=lambda kv: int(kv[0])))

    plt = pyplot()
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(11, 4), sharey=True)
    for ax, (target, by_recipe) in zip(axes, curves.items(), strict=True):
        for name, curve in by_recipe.items():
            ax.plot([int(k) for k in curve], list(curve.values()), "o-", label=name)
        goal = (TARGETS[target] + 1) / 2
        ax.axhline(goal, color="gray", linestyle="--", label=f"target ({goal:.0f})")
        ax.set(
            title=f"fine-tuned on one '{target}' image",
            xlabel="fine-tuning steps",
            ylabel="mean brightness of samples (0-1)",
            ylim=(-0.02, 1.02),
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    plot = save_figure(fig, out / "finetune_brightness.png")

    final = {t: {name: list(c.values())[-1] for name, c in by.items()} for t, by in curves.items()}
    black = final["solid black"]
    fixes = {k: v for k, v in black.items() if k != "baseline"}
    best = min(fixes, key=fixes.get) if fixes else None
    findings = []
    if "baseline" in black and best is not None:
        findings.append(
            {
                "claim": f"Fine-tuned on one solid black image for {p.finetune_steps} steps, the SD recipe still "
                "cannot "
                f"make it; a fix can (seed 000)",
                "verdict": "reproduced"
                if black["baseline"] > 0.15 and fixes[best] < 0.1
                else ("partly" if fixes[best] < black["baseline"] else "not reproduced"),
                "evidence": "brightness of 'solid black' samples after fine-tuning: "
                + ", ".join(f"{k} {v:.3f}" for k, v in black.items())
                + " (target 0)",
            }
        )
    return {"numbers": {"curves": curves, "final": final}, "plots": [plot], "findings": findings}
