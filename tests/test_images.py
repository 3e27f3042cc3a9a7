"""Image I/O (fullrange.images): reading modes and sizes, float → uint8, grids, atomic and exclusive PNG writes."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fullrange import images
from fullrange.config import ConfigError


def _save(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return path


def test_modes_are_converted_with_their_brightness(tmp_path):
    deep = _save(tmp_path / "deep.png", np.full((32, 32), 65535, dtype=np.uint16))
    gray = _save(tmp_path / "gray.png", np.full((32, 32), 10, dtype=np.uint8), mode="L")
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., :3], rgba[..., 3] = 30, 0
    rgba = _save(tmp_path / "rgba.png", rgba, mode="RGBA")
    white16 = images.load_image(deep, 16)
    assert white16.shape == (3, 16, 16)
    torch.testing.assert_close(white16, torch.ones_like(white16))  # 16-bit white stays white
    x = images.load_image(gray, 16)
    torch.testing.assert_close(x, torch.full_like(x, 10 / 127.5 - 1))
    x = images.load_image(rgba, 16)
    torch.testing.assert_close(x, torch.full_like(x, 30 / 127.5 - 1))  # the colour under a transparent alpha


def test_resize_and_centre_crop(tmp_path):
    good = _save(tmp_path / "good.png", np.full((40, 60, 3), 200, dtype=np.uint8))
    x = images.load_image(good, 16)  # 60x40 -> 24x16 -> crop 16x16
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x, torch.full_like(x, 200 / 127.5 - 1), atol=1e-5, rtol=0)
    x = images.load_image(good, (24, 16))  # 60x40 covers 24x16 at scale 0.4
    assert x.shape == (3, 16, 24)
    assert images.cover_crop((60, 40), (16, 16)) == ((24, 16), (4, 0))


def test_read_image_names_the_field_it_came_from(tmp_path):
    with pytest.raises(ConfigError, match="no such file") as err:
        images.read_image(tmp_path / "none.png", 16, "tone_image")
    assert err.value.field == "tone_image"
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ConfigError, match="not a readable image") as err:
        images.read_image(tmp_path / "text.png", 16, "mask")
    assert err.value.field == "mask"


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-0.5, 0.0, 0.5 / 255, 1.49 / 255, 1.0, 2.0]).view(1, 1, 1, 6).expand(2, 3, 1, 6)
    out = images.to_uint8(x)
    assert out.shape == (2, 1, 6, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 0, 1, 255, 255]  # round half to even at 0.5, as torch rounds
    assert images.to_uint8(x[0]).shape == (1, 6, 3)


def test_tile_places_images_row_by_row():
    arrays = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1).repeat(2, 1).repeat(2, 2).repeat(3, 3)
    grid = images.tile(arrays, columns=2)
    assert grid.shape == (6, 4, 3)
    assert grid[::2, ::2, 0].tolist() == [[0, 1], [2, 3], [4, 0]]  # last cell padded black


def test_save_png_is_atomic_and_keeps_text(tmp_path):
    array = np.full((4, 5, 3), 77, dtype=np.uint8)
    path = images.save_png(tmp_path / "sub" / "a.png", array, {"fullrange": "{}"})
    assert Image.open(path).text == {"fullrange": "{}"}
    assert np.asarray(Image.open(path)).tolist() == array.tolist()
    images.save_png(path, array * 2)  # replaces, through a temporary file that is gone afterwards
    assert np.asarray(Image.open(path)).max() == 154
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.png"]


def test_save_new_png_never_replaces_anything(tmp_path):
    (tmp_path / "x.png").write_bytes(b"mine")
    os.symlink(tmp_path / "elsewhere.png", tmp_path / "x-2.png")  # a dangling link takes its name too
    array = np.zeros((2, 2, 3), dtype=np.uint8)
    first = images.save_new_png(tmp_path, "x", array)
    second = images.save_new_png(tmp_path, "x", array)
    assert (first.name, second.name) == ("x-3.png", "x-4.png")
    assert (tmp_path / "x.png").read_bytes() == b"mine" and not (tmp_path / "elsewhere.png").exists()
    assert Image.open(io.BytesIO(first.read_bytes())).size == (2, 2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
