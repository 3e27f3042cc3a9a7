import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fullrange import data


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def messy(tmp_path):
    rgb = Image.fromarray(np.full((40, 60, 3), 200, dtype=np.uint8))
    (tmp_path / "good.png").write_bytes(_png(rgb))
    (tmp_path / "good.txt").write_text("a bright scene")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (tmp_path / "corrupt.txt").write_text("x")
    (tmp_path / "truncated.png").write_bytes(
        _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))[:400]
    )
    (tmp_path / "truncated.txt").write_text("x")
    (tmp_path / "gray.png").write_bytes(_png(Image.fromarray(np.full((32, 32), 10, dtype=np.uint8), mode="L")))
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., :3], rgba[..., 3] = 30, 0
    (tmp_path / "rgba.png").write_bytes(_png(Image.fromarray(rgba, mode="RGBA")))
    deep = Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16))
    (tmp_path / "deep.png").write_bytes(_png(deep))
    (tmp_path / "tiny.png").write_bytes(_png(Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8))))
    (tmp_path / "tiny.txt").write_text("tiny")
    (tmp_path / "nocaption.png").write_bytes(_png(rgb))
    (tmp_path / "metadata.jsonl").write_text(
        "\n".join(
            json.dumps({"file_name": n, "text": t})
            for n, t in [("gray.png", "a dark scene"), ("rgba.png", "dark"), ("deep.png", "a white background")]
        )
    )
    return tmp_path


def test_messy_folder_is_validated_up_front(messy):
    items, problems = data.scan(messy, min_size=16)
    assert [i.path.name for i in items] == ["deep.png", "good.png", "gray.png", "rgba.png"]
    assert {i.path.name: i.caption for i in items}["gray.png"] == "a dark scene"
    reasons = {p.path.name: p.reason for p in problems}
    assert set(reasons) == {"corrupt.png", "truncated.png", "tiny.png", "nocaption.png"}
    assert reasons["corrupt.png"].startswith("unreadable or truncated")
    assert reasons["truncated.png"].startswith("unreadable or truncated")
    assert reasons["tiny.png"].startswith("too small: 4x4")
    assert reasons["nocaption.png"].startswith("no caption")


def test_nothing_usable_is_a_clear_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(data.DataError, match=r"no usable image \(bad.png: unreadable"):
        data.scan(tmp_path, 16)
    with pytest.raises(data.DataError, match="not a directory"):
        data.scan(tmp_path / "missing", 16)
    # A bad metadata row is a listed skip; the images it does not concern train.
    (tmp_path / "metadata.jsonl").write_text('{not json}\n{"file_name": "good.png", "text": "grey"}\n')
    Image.fromarray(np.full((20, 20, 3), 100, dtype=np.uint8)).save(tmp_path / "good.png")
    items, problems = data.scan(tmp_path, 16)
    assert [i.caption for i in items] == ["grey"]
    assert [(p.path.name, p.reason.split(":")[0]) for p in problems] == [
        ("metadata.jsonl", "line 1"),
        ("bad.png", "unreadable"),
    ]


def test_cache_key_follows_content_and_model(messy):
    a = data.cache_key(messy / "good.png", "model-a", 16)
    assert a == data.cache_key(messy / "good.png", "model-a", 16)
    assert a != data.cache_key(messy / "good.png", "model-b", 16)
    assert a != data.cache_key(messy / "good.png", "model-a", 32)
    assert a != data.cache_key(messy / "gray.png", "model-a", 16)


@pytest.mark.parametrize("resolution,step", [(512, 64), (1024, 64), (16, 4)])
def test_buckets(resolution, step):
    sizes = data.buckets(resolution, step=step)
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        assert w % step == 0 and h % step == 0 and w * h <= resolution**2
        assert max(w / h, h / w) <= 2.0
        assert (h, w) in sizes
    assert data.nearest_bucket(1920, 1080, data.buckets(512)) == (640, 384)
    assert data.nearest_bucket(700, 700, data.buckets(512)) == (512, 512)


def test_kohya_folders_repeat_their_images_and_caption_them(tmp_path, monkeypatch):
    """kohya's layout: ``N_name`` subfolders repeat their images N times and caption those without a caption file
    ``name``; ``.caption`` files are read with caption_extension; the training batches draw an image of N repeats N
    times as often (over many draws, as an epoch that shows it N times)."""
    from fullrange.sd.latents import latent_batches

    for folder, names in (("10_sks dog", ("a", "b")), ("2_a cat", ("c",))):
        (tmp_path / folder).mkdir()
        for name in names:
            Image.fromarray(np.full((20, 20, 3), 100, dtype=np.uint8)).save(tmp_path / folder / f"{name}.png")
    (tmp_path / "10_sks dog" / "b.caption").write_text("sks dog on a beach")
    (tmp_path / "10_sks dog" / "b.txt").write_text("not read: the extension is .caption")
    Image.fromarray(np.full((20, 20, 3), 9, dtype=np.uint8)).save(tmp_path / "top.png")
    items, problems = data.scan(tmp_path, 16, default_caption="", caption_extension=".caption")
    found = {i.path.name: (i.caption, i.repeats) for i in items}
    assert found == {"a.png": ("sks dog", 10), "b.png": ("sks dog on a beach", 10), "c.png": ("a cat", 2)}
    assert [p.path.name for p in problems] == ["top.png"]  # no caption and no default: listed
    items, _ = data.scan(tmp_path, 16, default_caption="a photo", caption_extension=".caption")
    assert {i.path.name: i.caption for i in items}["top.png"] == "a photo"

    class Model:  # what latent_batches reads of a model: cached caption states and the UNet's conditioning
        def condition(self, text, sizes):
            return text

    n = len(items)
    states = {"encoder_hidden_states": torch.zeros(n + 1, 1, 1)}
    monkeypatch.setattr("fullrange.sd.latents.encode_captions", lambda model, captions, cache: states)
    means = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    repeats_of = [i.repeats for i in items]
    draw = latent_batches(Model(), means, torch.zeros_like(means), ["x"] * n, 0.0, tmp_path, None, False, repeats_of)
    counts = torch.bincount(draw(40_000, torch.Generator().manual_seed(0)).x0.flatten().long(), minlength=n)
    repeats = torch.tensor([i.repeats for i in items], dtype=torch.float64)
    expected = 40_000 * repeats / repeats.sum()
    assert ((counts - expected).abs() < 5 * expected.sqrt()).all(), (counts.tolist(), expected.tolist())


def test_a_caption_too_large_is_listed_not_read(tmp_path):
    Image.fromarray(np.full((20, 20, 3), 100, dtype=np.uint8)).save(tmp_path / "big.png")
    (tmp_path / "big.txt").write_text("x" * (data.CAPTION_LIMIT + 1))
    Image.fromarray(np.full((20, 20, 3), 100, dtype=np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("fine")
    items, problems = data.scan(tmp_path, 16)
    assert [i.path.name for i in items] == ["ok.png"]
    assert problems[0].path.name == "big.png" and "too large" in problems[0].reason
