"""The one home of image I/O: reading (EXIF orientation, modes, animations, decompression bombs), fitting to a size,
float ↔ uint8, grids, and PNG files written atomically (and exclusively where nothing may be overwritten)."""

from __future__ import annotations

import io
import itertools
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from .config import ConfigError
from .files import write_bytes


def open_rgb(path: Path | str) -> Image.Image:
    """An image as 8-bit RGB, EXIF orientation applied, the first frame of an animation. 16-bit and 32-bit grey
    are rescaled (PIL's own conversion clips them at 255); alpha is dropped, keeping the colour under it.
    Decompression bombs raise (``PIL.Image.DecompressionBombError``, at any size above ``MAX_IMAGE_PIXELS``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombWarning as err:
            raise Image.DecompressionBombError(str(err)) from None
    with img:
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            values = np.asarray(img, dtype=np.float64)
            peak = 65535.0 if img.mode != "I" or values.max() > 255 else 255.0
            img = Image.fromarray(np.clip(values / peak * 255 + 0.5, 0, 255).astype(np.uint8), mode="L")
        elif img.mode == "F":
            img = Image.fromarray(np.clip(np.asarray(img) * 255 + 0.5, 0, 255).astype(np.uint8), mode="L")
        return img.convert("RGB")


def cover_crop(image_size: tuple[int, int], size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """How :func:`load_image` fits an image of ``image_size`` (width, height) to ``size``: the resized (width,
    height) that covers it, and the (left, top) corner of the centred crop."""
    (w, h), (width, height) = image_size, size
    scale = max(width / w, height / h)
    resized = (max(width, round(w * scale)), max(height, round(h * scale)))
    return resized, ((resized[0] - width) // 2, (resized[1] - height) // 2)


def load_image(path: Path | str, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize to cover ``size`` (a side, or ``(width, height)``; Lanczos), centre-crop, scale to [-1, 1];
    shape (3, height, width)."""
    width, height = (size, size) if isinstance(size, int) else size
    img = open_rgb(path)
    resized, (left, top) = cover_crop(img.size, (width, height))
    img = img.resize(resized, Image.LANCZOS).crop((left, top, left + width, top + height))
    array = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    return array.permute(2, 0, 1) / 127.5 - 1


def read_image(path: Path | str, size: int | tuple[int, int], field: str) -> torch.Tensor:
    """:func:`load_image` of a file a user named: a missing or unreadable file is a one-line error naming ``field``
    (the config field it came from)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, f"{path}: no such file")
    try:
        return load_image(path, size)
    except Image.DecompressionBombError as err:
        raise ConfigError(field, f"{path}: refused as a decompression bomb ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ConfigError(field, f"{path}: not a readable image ({type(err).__name__})") from None


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [0, 1], (N, C, H, W) or (C, H, W), as uint8 arrays (N, H, W, C) or (H, W, C), rounded."""
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.movedim(-3, -1).numpy()


def tile(images: np.ndarray, columns: int) -> np.ndarray:
    """``(N, H, W, C)`` images as one ``(rows·H, columns·W, C)`` grid, row by row, padded with black."""
    n, h, w, c = images.shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    padded = np.concatenate([images, np.zeros((rows * columns - n, h, w, c), dtype=images.dtype)])
    return padded.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


def _png(image: Image.Image | np.ndarray, text: dict[str, str] | None) -> bytes:
    """The PNG bytes of an image (a PIL image or a uint8 (H, W, C) array) with ``text`` chunks."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(
    path: Path | str, image: Image.Image | np.ndarray, text: dict[str, str] | None = None, *, exclusive: bool = False
) -> Path:
    """``image`` as a PNG at ``path``, atomically (a crash leaves the old file or the new one); ``exclusive``: never
    replacing anything (``FileExistsError``)."""
    write_bytes(path, _png(image, text), exclusive=exclusive)
    return Path(path)


def save_new_png(
    folder: Path | str, stem: str, image: Image.Image | np.ndarray, text: dict[str, str] | None = None
) -> Path:
    """``image`` as a PNG in ``folder`` under a name no file has, atomically, never replacing anything (two runs
    cannot both take a name): ``stem.png``, else ``stem-2.png``, ``stem-3.png``, ... Returns the path."""
    data = _png(image, text)
    for n in itertools.count(1):
        path = Path(folder) / f"{stem}{'' if n == 1 else f'-{n}'}.png"
        try:
            write_bytes(path, data, exclusive=True)
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")
