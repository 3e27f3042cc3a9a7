"""What the experiments share: presets, the run context (data, trained models), sampling, files and plots."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import batches, metrics, toy
from ..files import write_bytes
from ..guidance import Shaping
from ..images import save_png, to_uint8
from ..losses import RECIPES, Recipe
from ..models import tiny_unet
from ..sampling import sample
from ..train import TrainConfig, train


@dataclass(frozen=True)
class Preset:
    """Sizes and budgets of one reproduction run. ``seed`` draws the data set and the exact-denoiser sweep;
    every trained-model figure is measured once per seed in ``seeds`` (its own initialisation, training draws and
    sampling noise) and reported with its range."""

    name: str
    size: int = 16
    channels: int = 3
    num_images: int = 2000
    width: int = 16
    train_steps: int = 200
    batch_size: int = 32
    lr: float = 2e-3
    finetune_steps: int = 120
    finetune_lr: float = 5e-4
    finetune_batch_size: int = 8
    finetune_evals: int = 4
    num_samples: int = 150
    sample_steps: int = 25
    sampler: str = "ddim"
    sweep_sides: tuple[int, ...] = (8, 16, 32, 64)
    sweep_steps: tuple[int, ...] = (10, 25, 50)
    sweep_batch: int = 128
    spacing_steps: tuple[int, ...] = (5, 10, 25)
    seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)


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
        finetune_batch_size=64,
        finetune_evals=6,
        num_samples=1000,
        sample_steps=50,
        sweep_sides=(8, 16, 32, 64, 128),
        sweep_batch=256,
        spacing_steps=(5, 10, 25, 50),
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

    def new_model(self, seed: int = 0) -> torch.nn.Module:
        return tiny_unet(self.preset.size, self.preset.channels, width=self.preset.width, seed=seed)

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

    def model(self, recipe_name: str, seed: int = 0) -> torch.nn.Module:
        """The EMA model trained from scratch with a recipe and seed (trained, or resumed, on first use)."""
        key = f"{recipe_name}/seed_{seed}"
        if key not in self._models:
            images, labels = self.data
            result = train(
                self.new_model(seed),
                batches.labelled(images, labels, NULL_LABEL),
                self.recipes[recipe_name],
                self.train_config(seed=seed),
                self.out / "models" / key,
                progress=self.progress,
                description=f"train {recipe_name}, seed {seed}",
            )
            self._models[key] = result.apply_ema().eval().requires_grad_(False)
        return self._models[key]


def default_recipes(size: int) -> dict[str, Recipe]:
    """The four recipes, plus offset noise scaled to this image size: Guttenberg's 0.1 on 64×64 latents is 6.4× the
    std of a channel's noise mean (1/64); ``0.1 · 64 / size`` keeps that ratio at ``size``."""
    scaled = Recipe("offset_scaled", noise="offset", offset_strength=round(0.1 * 64 / size, 4))
    return dict(RECIPES) | {"offset_scaled": scaled}


def sample_labels(
    ctx: Context,
    model: torch.nn.Module,
    recipe: Recipe,
    labels: torch.Tensor,
    *,
    steps: int | None = None,
    spacing: str | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    shaping: Shaping | None = None,
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
        spacing=spacing or recipe.spec.spacing,  # the recipe's own, as the article and the paper sample
        cond={"class_labels": labels.to(device)},
        uncond={"class_labels": torch.full_like(labels, NULL_LABEL).to(device)},
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        shaping=shaping,
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


def provenance() -> dict:
    """What produced a result: fullrange's git commit (``+dirty`` with uncommitted changes; ``None`` outside a
    checkout), package versions, the machine, and the time."""
    import datetime
    import os
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    here = Path(__file__).parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short=12", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no", "--", str(here.parents[1])):
        commit += "+dirty"
    versions = {}
    for package in ("fullrange", "torch", "diffusers", "accelerate", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "commit": commit,
        "versions": versions | {"python": platform.python_version()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
        f"{device}, {platform.system()} {platform.release()}",
        "finished": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_json(path: Path, data: dict) -> None:
    write_bytes(path, json.dumps(data, indent=2, default=_jsonable).encode())


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def label_grid(
    samples: torch.Tensor,
    labels: torch.Tensor,
    path: Path,
    data: tuple[torch.Tensor, torch.Tensor],
    per_label: int = 10,
) -> str:
    """One labelled row per label (in :data:`toy.LABELS` order): two data images of that label, then ``per_label``
    samples (see :func:`labelled_grid`)."""
    images, data_labels = data
    rows = [
        (name, [images[data_labels == k][:2], samples[labels == k][:per_label]])
        for k, name in enumerate(toy.LABELS)
        if (labels == k).any()
    ]
    return labelled_grid(rows, ["data", "samples"], path)


def labelled_grid(rows: list[tuple[str, list[torch.Tensor]]], headers: list[str], path: Path, scale: int = 4) -> str:
    """A PNG of labelled rows, each a list of groups of images in [-1, 1] (the same number of groups per row, one
    ``headers`` entry each): every image upscaled ``scale``× without smoothing, on a mid-grey ground with gutters,
    a wider gap between groups and a border, so white and black images both stand out."""
    from PIL import Image, ImageDraw, ImageFont

    side = rows[0][1][-1].shape[-1] * scale
    gutter, gap, label_width, header = 4, 16, 120, 18
    font = ImageFont.load_default(size=13)  # Pillow's bundled FreeType font (Pillow >= 10.1)
    canvas = Image.new("RGB", (1, 1))
    draw = ImageDraw.Draw(canvas)
    widths = [
        max(max(len(groups[g]) for _, groups in rows) * (side + gutter), int(draw.textlength(text, font=font)) + gap)
        for g, text in enumerate(headers)
    ]
    lefts = [label_width]
    for w in widths[:-1]:
        lefts.append(lefts[-1] + w + gap)
    width = lefts[-1] + widths[-1] + gutter
    height = header + len(rows) * (side + gutter) + gutter
    canvas = Image.new("RGB", (width, height), (150, 150, 150))
    draw = ImageDraw.Draw(canvas)
    for left, text in zip(lefts, headers, strict=True):
        draw.text((left, 2), text, fill=(0, 0, 0), font=font)
    for r, (label, groups) in enumerate(rows):
        y = header + r * (side + gutter)
        draw.text((6, y + side // 2 - 7), label, fill=(0, 0, 0), font=font)
        for left, images in zip(lefts, groups, strict=True):
            for c, image in enumerate(images):
                tile_image = Image.fromarray(to_uint8((image[:3].expand(3, -1, -1) + 1) / 2))
                canvas.paste(tile_image.resize((side, side), Image.NEAREST), (left + c * (side + gutter), y))
    draw.rectangle((0, 0, width - 1, height - 1), outline=(40, 40, 40), width=2)
    return save_png(path, canvas).name
