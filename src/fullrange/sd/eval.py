"""How wide a brightness range a Stable Diffusion model reaches: a fixed prompt set, per-prompt statistics."""

from __future__ import annotations

import json
from pathlib import Path

from .. import metrics
from ..files import write_bytes
from ..plots import brightness_per_prompt
from .model import StableDiffusion
from .sample import SampleSettings, generate, resolve, save_grid, save_images

PROMPTS = {
    # From the offset-noise article.
    "A dark alley in the rain": "dark",
    "Monochrome line-art logo on a white background": "bright",
    "A sunny snowy slope": "bright",
    "A plaza lit only by torches": "dark",
    "Solid black background": "dark",
    "A white background": "bright",
    # More of each kind.
    "A starless night sky": "dark",
    "A coal mine tunnel with no light": "dark",
    "Fresh snow under an overcast white sky": "bright",
    "A brightly lit white studio backdrop": "bright",
    "A photo of a cat on a sofa": "neutral",
}


def evaluate(
    model: StableDiffusion, settings: SampleSettings, out: Path, num_images: int = 4, prompts: dict[str, str] = PROMPTS
) -> dict:
    """Per prompt: mean brightness, spread of per-image means, fractions of near-black (< 0.05) and
    near-white (> 0.95) pixels; images and a grid per prompt go under ``out``."""
    results = {}
    for i, (prompt, kind) in enumerate(prompts.items()):
        batch = [prompt] * num_images
        images = generate(model, batch, settings)
        save_images(images, batch, resolve(model, settings)[0], out / f"{i:02d}")
        save_grid(images, out / f"{i:02d}", settings.seed)
        data = images * 2 - 1
        means = metrics.brightness(data)
        luminance = images.mean(1)
        results[prompt] = {
            "kind": kind,
            "mean_brightness": float(means.mean()),
            "spread": float(means.std()) if num_images > 1 else 0.0,
            "near_black": float((luminance < 0.05).double().mean()),
            "near_white": float((luminance > 0.95).double().mean()),
        }
    return results


def summarize(results: dict) -> dict:
    """The range the model reaches: darkest 'dark' prompt, brightest 'bright' prompt, and their gap."""
    dark = [r["mean_brightness"] for r in results.values() if r["kind"] == "dark"]
    bright = [r["mean_brightness"] for r in results.values() if r["kind"] == "bright"]
    return {"darkest_dark_prompt": min(dark), "brightest_bright_prompt": max(bright), "range": max(bright) - min(dark)}


def write(all_results: dict[str, dict], out: Path) -> Path:
    """``brightness.json`` (per model: per prompt and :func:`summarize`) and ``brightness.png`` in ``out``."""
    summary = {name: {"prompts": results, "summary": summarize(results)} for name, results in all_results.items()}
    path = out / "brightness.json"
    write_bytes(path, json.dumps(summary, indent=2).encode())
    brightness_per_prompt(all_results, out / "brightness.png")
    return path
