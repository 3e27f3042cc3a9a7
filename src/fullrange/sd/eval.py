"""How wide a brightness range a Stable Diffusion model reaches: a fixed prompt set, per-prompt statistics."""

from __future__ import annotations

import json
from pathlib import Path

from .. import metrics
from .model import StableDiffusion
from .sample import SampleSettings, generate, save_grid, save_images

PROMPTS = {
    # From the seed documents.
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
        save_images(images, batch, settings, out / f"{i:02d}")
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


def plot(all_results: dict[str, dict], path: Path) -> None:
    """Mean brightness per prompt, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = list(next(iter(all_results.values())))
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(prompts) + 1.5))
    height = 0.8 / len(all_results)
    for k, (name, results) in enumerate(all_results.items()):
        ys = [i + k * height for i in range(len(prompts))]
        ax.barh(ys, [results[p]["mean_brightness"] for p in prompts], height, label=name)
    ax.set_yticks([i + height * (len(all_results) - 1) / 2 for i in range(len(prompts))], prompts, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.5, color="gray", linestyle="--")
    ax.set(xlabel="mean brightness of the images (0 black, 1 white)", xlim=(0, 1), title="Brightness per prompt")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(all_results: dict[str, dict], out: Path) -> Path:
    summary = {name: {"prompts": results, "summary": summarize(results)} for name, results in all_results.items()}
    path = out / "brightness.json"
    path.write_text(json.dumps(summary, indent=2))
    plot(all_results, out / "brightness.png")
    return path
