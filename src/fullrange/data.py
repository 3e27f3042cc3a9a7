"""Image + caption folders: validation up front, loading at a training resolution, and latent caching.

Captions come from a sidecar ``NAME.txt`` or a ``metadata.jsonl`` with ``file_name`` and ``text`` (the
Hugging Face imagefolder convention); a sidecar wins. Every file is checked before training: unreadable,
truncated, too small and uncaptioned ones are listed with the reason and skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str
    size: tuple[int, int]


@dataclass(frozen=True)
class Problem:
    path: Path
    reason: str


class DataError(ValueError):
    """No usable image in a data folder."""


def _captions_from_metadata(folder: Path) -> dict[str, str]:
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        return {}
    captions = {}
    for number, line in enumerate(meta.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[row["file_name"]] = str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{meta}:{number}: not a JSON object with file_name and text") from None
    return captions


def open_rgb(path: Path) -> Image.Image:
    """An image as 8-bit RGB. 16-bit and 32-bit grey are rescaled (PIL's own conversion clips them at 255);
    alpha is dropped, keeping the colour under it."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            values = np.asarray(img, dtype=np.float64)
            peak = 65535.0 if img.mode != "I" or values.max() > 255 else 255.0
            img = Image.fromarray(np.clip(values / peak * 255 + 0.5, 0, 255).astype(np.uint8), mode="L")
        elif img.mode == "F":
            img = Image.fromarray(np.clip(np.asarray(img) * 255 + 0.5, 0, 255).astype(np.uint8), mode="L")
        return img.convert("RGB")


def scan(folder: Path | str, min_size: int, default_caption: str = "") -> tuple[list[Item], list[Problem]]:
    """Check every image in ``folder``; returns the usable items and the problems, each with its reason.
    ``default_caption`` serves images that have none (class images for prior preservation)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory")
    captions = _captions_from_metadata(folder)
    items, problems = [], []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text().strip() if sidecar.is_file() else captions.get(path.name, "").strip()
        caption = caption or default_caption
        try:
            with Image.open(path) as img:
                img.verify()
            width, height = open_rgb(path).size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            problems.append(Problem(path, f"unreadable or truncated ({type(err).__name__}: {err})"))
            continue
        if min(width, height) < min_size:
            problems.append(Problem(path, f"too small: {width}x{height}, the shorter side must be >= {min_size}"))
        elif not caption:
            problems.append(Problem(path, "no caption (NAME.txt or a metadata.jsonl row)"))
        else:
            items.append(Item(path, caption, (width, height)))
    if not items:
        listed = "; ".join(f"{p.path.name}: {p.reason}" for p in problems[:5]) or "no image files"
        raise DataError(f"{folder}: no usable image ({listed})")
    return items, problems


def cover_crop(image_size: tuple[int, int], size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """How :func:`load_image` fits an image of ``image_size`` (width, height) to ``size``: the resized (width,
    height) that covers it, and the (left, top) corner of the centred crop."""
    (w, h), (width, height) = image_size, size
    scale = max(width / w, height / h)
    resized = (max(width, round(w * scale)), max(height, round(h * scale)))
    return resized, ((resized[0] - width) // 2, (resized[1] - height) // 2)


def load_image(path: Path, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize to cover ``size`` (a side, or ``(width, height)``; Lanczos), centre-crop, scale to [-1, 1];
    shape (3, height, width)."""
    width, height = (size, size) if isinstance(size, int) else size
    img = open_rgb(path)
    resized, (left, top) = cover_crop(img.size, (width, height))
    img = img.resize(resized, Image.LANCZOS).crop((left, top, left + width, top + height))
    array = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    return array.permute(2, 0, 1) / 127.5 - 1


def buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (NovelAI / kohya): ``(width, height)``, multiples of ``step``, with at most
    ``resolution²`` pixels and aspect ratios up to ``max_ratio``, the square one included."""
    if resolution % step:
        raise ValueError(f"resolution {resolution} is not a multiple of the bucket step {step}")
    sizes = {(resolution, resolution)}
    width = resolution + step
    while True:
        height = resolution * resolution // width // step * step
        if height <= 0 or width / height > max_ratio:
            break
        sizes |= {(width, height), (height, width)}
        width += step
    return sorted(sizes, key=lambda wh: wh[0] / wh[1])


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's, in log ratio."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda wh: abs(math.log(wh[0] / wh[1]) - ratio))


def cache_key(path: Path, model_id: str, resolution: int | tuple[int, int]) -> str:
    """Content hash of the file plus what the latent depends on: the same bytes give the same key anywhere."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashlib.sha256(f"{digest}:{model_id}:{resolution}".encode()).hexdigest()[:32]
