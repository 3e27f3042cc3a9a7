"""Image + caption folders: validation up front, aspect-ratio buckets, and the keys of the latent cache.

Captions come from a sidecar ``NAME.txt`` or a ``metadata.jsonl`` with ``file_name`` and ``text`` (the
Hugging Face imagefolder convention); a sidecar wins. Text is UTF-8 (a byte-order mark is honoured); anything
else is refused. Every file is checked before training, and each one that cannot be used is listed with its
reason and skipped, the run training on the rest: a caption or metadata row that is not UTF-8 or not well-formed,
a file that is not a regular file (a pipe would block), an image that is unreadable, truncated, a decompression
bomb (more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``), in a format Pillow cannot decode, too small, or without a
caption. Images are read as :mod:`fullrange.images` reads them (EXIF orientation applied, the first frame of an
animation).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .files import read_text, sha256
from .images import open_rgb

CAPTION_LIMIT = 2**16
"""The largest caption file read (64 KiB; CLIP reads 77 tokens); larger ones are listed as skipped, never read whole."""
METADATA_LIMIT = 2**28
"""The largest ``metadata.jsonl`` read (256 MiB)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif", ".heic", ".heif")
"""Files the scan considers; those Pillow cannot decode here (HEIC without a plug-in) are listed as skipped."""


@dataclass(frozen=True)
class Item:
    """A usable image: its file, caption, (width, height) as trained, and how often an epoch shows it (kohya's
    ``N_name`` folders repeat their images N times)."""

    path: Path
    caption: str
    size: tuple[int, int]
    repeats: int = 1


@dataclass(frozen=True)
class Problem:
    path: Path
    reason: str


class DataError(ValueError):
    """No usable image in a data folder."""


def _captions_from_metadata(folder: Path) -> tuple[dict[str, str], list[Problem]]:
    """Captions by file name from ``metadata.jsonl``, and its rows that cannot be used, each with its reason."""
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        return {}, []
    try:
        text = read_text(meta, limit=METADATA_LIMIT)
    except ValueError as err:
        return {}, [Problem(meta, f"{err}; no caption taken from it")]
    captions, problems = {}, []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(Problem(meta, f"line {number}: not JSON ({err.msg}); row skipped"))
            continue
        name = row.get("file_name") if isinstance(row, dict) else None
        caption = row.get("text") if isinstance(row, dict) else None
        if not isinstance(name, str) or not isinstance(caption, str):
            problems.append(Problem(meta, f"line {number}: needs string file_name and text; row skipped"))
            continue
        captions[name] = caption
    return captions, problems


def _caption(path: Path, captions: dict[str, str], default: str, extension: str) -> tuple[str, str | None]:
    """The image's caption (its sidecar ``NAME`` + ``extension`` first) and, if its sidecar cannot be read, why."""
    sidecar = path.with_suffix(extension)
    if sidecar.is_file():
        try:
            return read_text(sidecar, limit=CAPTION_LIMIT).strip() or default, None
        except ValueError as err:
            return "", f"caption {err}"
    return captions.get(path.name, "").strip() or default, None


def _image_problem(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """The image's (width, height) as trained (EXIF orientation applied), or why it cannot be used."""
    if not path.is_file():  # a pipe, socket or device named like an image would block or never end
        return None, "not a regular file"
    try:
        return open_rgb(path).size, None
    except Image.DecompressionBombError as err:
        return None, f"refused as a decompression bomb ({err})"
    except UnidentifiedImageError:
        suffix = path.suffix.lower()
        if suffix not in Image.registered_extensions():
            return None, f"Pillow has no decoder for {suffix} here; convert it, or install a plug-in (pillow-heif)"
        return None, f"unreadable: not a {suffix} image Pillow can read"
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        return None, f"unreadable or truncated ({type(err).__name__}: {err})"


KOHYA_FOLDER = re.compile(r"(\d+)_(.+)")
"""kohya's dataset layout: a subfolder ``N_name`` repeats its images N times, and ``name`` captions those without
a caption."""


def scan(
    folder: Path | str, min_size: int, default_caption: str = "", caption_extension: str = ".txt"
) -> tuple[list[Item], list[Problem]]:
    """Check every image in ``folder``, and in its kohya-style ``N_name`` subfolders (repeated N times, captioned
    ``name`` where an image has no caption); returns the usable items and the problems, each with its reason.
    Captions are ``NAME`` + ``caption_extension`` sidecars or ``metadata.jsonl`` rows; ``default_caption`` serves
    images that have neither (an instance prompt; the class prompt for class images)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory")
    groups = [(folder, 1, default_caption)]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()):
        if match := KOHYA_FOLDER.fullmatch(sub.name):
            groups.append((sub, int(match.group(1)), default_caption or match.group(2).strip()))
    items, problems = [], []
    for where, repeats, default in groups:
        found, trouble = _scan_one(where, min_size, default, caption_extension, repeats)
        items, problems = items + found, problems + trouble
    if not items:
        listed = "; ".join(f"{p.path.name}: {p.reason}" for p in problems[:5]) or "no image files"
        raise DataError(f"{folder}: no usable image ({listed})")
    return items, problems


def _scan_one(folder: Path, min_size: int, default: str, extension: str, repeats: int):
    """The usable items of one folder's images (not its subfolders) and its problems."""
    captions, problems = _captions_from_metadata(folder)
    items = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption, caption_problem = _caption(path, captions, default, extension)
        size, problem = _image_problem(path)
        problem = problem or caption_problem
        if problem is None and min(size) < min_size:
            problem = f"too small: {size[0]}x{size[1]}, the shorter side must be >= {min_size}"
        if problem is None and not caption:
            problem = f"no caption (NAME{extension}, a metadata.jsonl row, or a default caption)"
        if problem is None:
            items.append(Item(path, caption, size, repeats))
        else:
            problems.append(Problem(path, problem))
    return items, problems


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
    return hashlib.sha256(f"{sha256(path)}:{model_id}:{resolution}".encode()).hexdigest()[:32]
