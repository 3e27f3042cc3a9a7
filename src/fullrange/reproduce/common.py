"""What the experiments share: presets, the run context (data, trained models), sampling, files and plots."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import batches, metrics, toy
from ..images import tile
from ..losses import RECIPES, Recipe
from ..models import tiny_unet
from ..sampling import sample
from ..train import TrainConfig, train


@dataclass(frozen=True)
class Preset:
    """Sizes and budgets of one reproduction run."""

    name: str
    size: int = 16
    channels: int = 3
    num_images: int = 2000
    width: int = 32
    train_steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    finetune_steps: int = 120
    finetune_lr: float = 5e-4
    finetune_evals: int = 4
    num_samples: int = 150
    sample_steps: int = 25
    sampler: str = "ddim"
    sweep_sides: tuple[int, ...] = (8, 16, 32, 64)
    sweep_steps: tuple[int, ...] = (10, 25, 50)
    sweep_batch: int = 128
    spacing_steps: tuple[int, ...] = (5, 10, 25, 50)
    seed: int = 0


PRESETS = {
    "micro": Preset(
        "micro",
        size=8,
        num_images=64,
        width=8,
        train_steps=4,
        batch_size=8,
        finetune_steps=4,
        finetune_evals=2,
        num_samples=10,
        sample_steps=3,
        sweep_sides=(4, 8),
        sweep_steps=(3, 6),
        sweep_batch=16,
        spacing_steps=(2, 4),
    ),
    "quick": Preset("quick"),
    "full": Preset(
        "full",
        size=32,
        channels=3,
        num_images=10_000,
        width=64,
        train_steps=20_000,
        batch_size=64,
        lr=1e-3,
        finetune_steps=1000,
        finetune_evals=6,
        num_samples=1000,
        sample_steps=50,
        sweep_sides=(8, 16, 32, 64, 128),
        sweep_batch=256,
    ),
}
NULL_LABEL = len(toy.LABELS)


@dataclass
class Context:
    """One reproduction run: its folder, preset, recipes, data and the models trained so far."""

    out: Path
    preset: Preset
    recipes: dict[str, Recipe] | None = None
    progress: bool = True
    _data: tuple[torch.Tensor, torch.Tensor] | None = None
    _models: dict[str, torch.nn.Module] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.recipes is None:
            self.recipes = default_recipes(self.preset.size)

    @property
    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._data is None:
            p = self.preset
            self._data = toy.synthetic_images(p.num_images, p.size, p.channels, p.seed)
        return self._data

    def new_model(self) -> torch.nn.Module:
        return tiny_unet(self.preset.size, self.preset.channels, width=self.preset.width, seed=self.preset.seed)

    def train_config(self, **changes) -> TrainConfig:
        p = self.preset
        base = TrainConfig(
            steps=p.train_steps,
            batch_size=p.batch_size,
            lr=p.lr,
            warmup=max(1, p.train_steps // 10),
            ema_decay=0.999,
            checkpoint_every=max(1, p.train_steps // 4),
            seed=p.seed,
        )
        return TrainConfig(**{**asdict(base), **changes})

    def model(self, recipe_name: str) -> torch.nn.Module:
        """The EMA model trained from scratch with a recipe (trained, or resumed, on first use)."""
        if recipe_name not in self._models:
            images, labels = self.data
            result = train(
                self.new_model(),
                batches.labelled(images, labels, NULL_LABEL),
                self.recipes[recipe_name],
                self.train_config(),
                self.out / "models" / recipe_name,
                progress=self.progress,
                description=f"train {recipe_name}",
            )
            self._models[recipe_name] = result.apply_ema().eval().requires_grad_(False)
        return self._models[recipe_name]


def default_recipes(size: int) -> dict[str, Recipe]:
    """The four recipes, plus offset noise scaled to this image size: seed 000's 0.1 on 64×64 latents is 6.4× the
    std of a channel's noise mean (1/64); ``0.1 · 64 / size`` keeps that ratio at ``size``."""
    scaled = Recipe("offset_scaled", noise="offset", offset_strength=round(0.1 * 64 / size, 4))
    return dict(RECIPES) | {"offset_scaled": scaled}


def generate(
    ctx: Context,
    model: torch.nn.Module,
    recipe: Recipe,
    labels: torch.Tensor,
    *,
    steps: int | None = None,
    spacing: str | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    seed: int = 1,
    leak: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw samples (data units, not clamped) for ``labels`` from a trained model; same seed, same noise; ``leak``
    as :func:`fullrange.sample` takes it."""
    p = ctx.preset
    noise = torch.randn(len(labels), p.channels, p.size, p.size, generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    out = sample(
        model,
        noise.to(device),
        recipe.spec,
        sampler=p.sampler,
        steps=steps or p.sample_steps,
        spacing=spacing or recipe.spec.spacing,  # the recipe's own, as the seed documents sample
        cond={"class_labels": labels.to(device)},
        uncond={"class_labels": torch.full_like(labels, NULL_LABEL).to(device)},
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        leak=None if leak is None else leak.to(device),
    )
    return out.float().cpu()


def balanced_labels(n: int) -> torch.Tensor:
    """``n`` labels, cycling through all of them."""
    return torch.arange(n) % len(toy.LABELS)


def brightness_summary(samples: torch.Tensor, labels: torch.Tensor, data: torch.Tensor, data_labels) -> dict:
    """Spread ratio, quantiles, a distance to the data, and per-label mean brightness (samples clamped to
    [-1, 1], as an image file would store them)."""
    samples = samples.clamp(-1, 1)
    b, ref = metrics.brightness(samples), metrics.brightness(data)
    per_label = {}
    for k, name in enumerate(toy.LABELS):
        mine, theirs = b[labels == k], ref[data_labels == k]
        if len(mine) and len(theirs):
            per_label[name] = {"samples": float(mine.mean()), "data": float(theirs.mean())}
    q = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    return {
        "spread_ratio": metrics.spread_ratio(samples, data),
        "saturation": metrics.saturation(samples),
        "quantiles": {"samples": b.quantile(q).tolist(), "data": ref.quantile(q).tolist()},
        "wasserstein": metrics.wasserstein_1d(b, ref),
        "per_label": per_label,
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable))


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path.name


def label_grid(samples: torch.Tensor, labels: torch.Tensor, path: Path, per_label: int = 10) -> str:
    """One row per label (in :data:`toy.LABELS` order), ``per_label`` samples each."""
    rows = [samples[labels == k][:per_label] for k in range(len(toy.LABELS))]
    columns = max(len(r) for r in rows)
    padded = [torch.cat([r, torch.zeros(columns - len(r), *r.shape[1:])]) for r in rows if len(r)]
    return save_grid(torch.cat(padded), path, columns=columns)


def log_steps_axis(ax, steps) -> None:
    """A log x axis labelled at exactly the step counts used."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_xticks(list(steps), [str(s) for s in steps])
    ax.xaxis.set_minor_formatter(NullFormatter())


def save_grid(images: torch.Tensor, path: Path, columns: int = 10, scale: int = 4) -> str:
    """Images in [-1, 1] (first 3 channels shown) as one PNG grid, ``scale``× nearest-neighbour."""
    from PIL import Image

    x = ((images[:, :3].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = tile(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x, columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
    return path.name
