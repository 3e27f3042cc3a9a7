"""What a sampled PNG says about how it was made: fullrange's own ``fullrange`` text chunk (JSON: the effective
settings, model and adapter with their hashes, prediction type) and an A1111-style ``parameters`` text, which A1111's
PNG Info, ComfyUI and civitai read."""

from __future__ import annotations

import json
import struct
from dataclasses import asdict
from pathlib import Path

from ..files import sha256

A1111_SAMPLERS = {
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "unipc": "UniPC",
}
A1111_SCHEDULES = {"karras": "Karras", "exponential": "Exponential"}


def model_hash(path: Path) -> str:
    """A1111's model hash (civitai's AutoV2): the first 10 hex digits of the SHA-256 of the weights file; for a
    diffusers folder, of its UNet's weights."""
    path = Path(path)
    if path.is_dir():
        found = sorted((path / "unet").glob("*.safetensors")) or sorted((path / "unet").glob("*"))
        if not found:
            return ""
        path = found[0]
    return sha256(path)[:10]


def lora_hash(path: Path) -> str:
    """A1111's LoRA hash (civitai's AutoV3): the first 12 hex digits of the SHA-256 of a safetensors file's tensor
    bytes, after its header (so editing the metadata keeps the hash); of ``pytorch_lora_weights.safetensors`` in a
    LoRA folder; of ``adapter_model.safetensors`` in an OFT folder."""
    path = Path(path)
    if path.is_dir():
        names = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
        path = next((path / n for n in names if (path / n).is_file()), path)
    with path.open("rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return sha256(path, 8 + header)[:12]


def source(model, adapter: Path | str | None = None, strength: float = 1.0, dtype: str = "fp32") -> dict:
    """What made a sampled image, for its PNG chunks: the model and adapter with A1111's hashes (each file hashed
    once while it is unchanged, :func:`fullrange.files.sha256`), the adapter's strength, the prediction type and zero
    terminal SNR it was sampled as, the weights' ``dtype`` and fullrange's version."""
    from importlib.metadata import version

    return {
        "model": str(model.source),
        "model_hash": model_hash(model.source),
        "adapter": None if adapter is None else str(adapter),
        "adapter_hash": None if adapter is None else lora_hash(adapter),
        "adapter_strength": None if adapter is None else strength,
        "prediction_type": model.spec.prediction,
        "zero_terminal_snr": model.spec.schedule.zero_terminal_snr,
        "dtype": dtype,
        "fullrange": version("fullrange"),
    }


def text_chunks(settings, seed: int, prompt: str, source: dict | None = None) -> dict[str, str]:
    """The PNG text chunks of an image sampled with (effective) ``settings`` from ``prompt`` and the noise of
    ``seed``: fullrange's ``fullrange`` JSON and A1111's ``parameters``."""
    info = describe(settings, seed, prompt, source or {})
    size = (settings.width, settings.height)
    return {"fullrange": json.dumps(info), "parameters": a1111_parameters(info, size)}


def describe(settings, seed: int, prompt: str, source: dict) -> dict:
    """The ``fullrange`` chunk of one image: its prompt and seed, the effective ``settings``, and ``source`` (model,
    hashes, adapter, prediction type, dtype, version)."""
    return {"prompt": prompt, **asdict(settings), "seed": seed, **source}


def a1111_parameters(info: dict, size: tuple[int, int]) -> str:
    """The A1111 ``parameters`` text of an image described by :func:`describe`: prompt, negative prompt, then
    ``Key: value`` pairs; A1111's own keys where it has the thing, fullrange's where it has not (spacing,
    prediction type, zero terminal SNR, guidance rescale)."""
    pairs = {
        "Steps": info["steps"],
        "Sampler": A1111_SAMPLERS.get(info["sampler"], info["sampler"]),
        "Schedule type": A1111_SCHEDULES.get(info["spacing"]),
        "Spacing": None if info["spacing"] in A1111_SCHEDULES else info["spacing"],
        "CFG scale": info["guidance"],
        "Guidance rescale": info["guidance_rescale"] or None,
        "Seed": info["seed"],
        "Size": f"{size[0]}x{size[1]}",
        "Model hash": info.get("model_hash"),
        "Model": Path(info["model"]).stem if info.get("model") else None,
        "Lora hashes": f'"{Path(info["adapter"]).stem}: {info["adapter_hash"]}"' if info.get("adapter") else None,
        "Lora strength": info.get("adapter_strength") if info.get("adapter") else None,
        "Prediction": info.get("prediction_type"),
        "Zero terminal SNR": info.get("zero_terminal_snr"),
        "Denoising strength": info["strength"] if info.get("image") else None,
        "Version": f"fullrange {info['fullrange']}" if info.get("fullrange") else None,
    }
    text = ", ".join(f"{k}: {_a1111_value(v)}" for k, v in pairs.items() if v is not None and v != "")
    negative = f"\nNegative prompt: {_text(info['negative_prompt'])}" if info.get("negative_prompt") else ""
    return f"{_text(info['prompt'])}{negative}\n{text}"


def _text(prompt: str) -> str:
    """A prompt as A1111 writes it into ``parameters``: newlines kept, other control characters (NUL, escapes) out."""
    return "".join(c for c in prompt if c in "\n\t" or c.isprintable())


def _a1111_value(value) -> str:
    text = str(value)
    return json.dumps(text) if "," in text and not text.startswith('"') else text
