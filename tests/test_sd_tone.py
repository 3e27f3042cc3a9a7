"""Sources of the leak for Stable Diffusion (brightness / colour, reference image, folder statistics) on tiny SD and
SDXL: each is checked in the first latent the sampler sees, against the VAE called directly."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fullrange.cli import app
from fullrange.config import ConfigError
from fullrange.leak import low_frequencies
from fullrange.sd import load_stable_diffusion
from fullrange.sd import tone as tones
from fullrange.sd.sample import SampleSettings, generate

PROMPTS = ["a dark room", "snow"]
runner = CliRunner()


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def model(request):
    return load_stable_diffusion(request.getfixturevalue("tiny_sd" if request.param == "sd" else "tiny_sdxl"))


def first_latents(model, settings):
    seen = []
    generate(model, PROMPTS, settings, callback=seen.append)
    return seen[0]


def vae_latent(model, pixels):
    """diffusers' own encoding, scaled as the UNet sees latents."""
    with torch.no_grad():
        return model.vae.encode(pixels).latent_dist.mean * model.vae.config.scaling_factor


def write_gradient(path, size=32, colour=(200, 40, 90)):
    ramp = np.linspace(0, 1, size)[None, :, None]
    array = (np.array(colour)[None, None, :] * ramp + 20).clip(0, 255).astype(np.uint8).repeat(size, axis=0)
    Image.fromarray(array).save(path)
    return path


def test_parse_tone():
    assert tones.parse_tone("0.05") == (0.05, 0.05, 0.05)
    assert tones.parse_tone("#1a1aff") == (26 / 255, 26 / 255, 1.0)
    for bad in ("1.5", "nan", "#12345", "dark"):
        with pytest.raises(ConfigError, match=r"tone '.*' is neither a brightness in \[0, 1\] nor a colour"):
            tones.parse_tone(bad)
    with pytest.raises(ConfigError, match="tone_image is a second source of tone: give only one"):
        SampleSettings(tone="0.1", tone_image="x.png")


def test_a_brightness_starts_from_the_vae_latent_of_a_solid_image(model):
    plain = first_latents(model, SampleSettings(steps=4))
    dark = first_latents(model, SampleSettings(steps=4, tone="#102030"))
    side = 8 * model.vae_scale_factor
    solid = torch.tensor([16, 32, 48]).view(1, 3, 1, 1) / 255 * 2 - 1
    L = vae_latent(model, solid.expand(1, 3, side, side)).mean((-2, -1), keepdim=True)
    ac = float(model.spec.schedule.alphas_cumprod[int(plain.t)])
    torch.testing.assert_close(dark.x, math.sqrt(ac) * L + math.sqrt(1 - ac) * plain.x, atol=1e-6, rtol=1e-5)


def test_a_reference_image_gives_its_latent_lowest_frequencies(model, tmp_path):
    path = write_gradient(tmp_path / "ref.png")
    size = model.unet.config.sample_size
    leak = tones.image_leak(model, path, (size, size))
    pixels = torch.from_numpy(np.array(Image.open(path).resize((size * model.vae_scale_factor,) * 2, Image.LANCZOS)))
    latent = vae_latent(model, pixels.permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1)
    torch.testing.assert_close(leak.mean((-2, -1)), latent.mean((-2, -1)), atol=1e-4, rtol=0)  # the DCT's (0, 0)
    k = min(tones.K, size)
    torch.testing.assert_close(
        low_frequencies(leak.double(), k), low_frequencies(latent.double(), k), atol=1e-4, rtol=0
    )
    plain = first_latents(model, SampleSettings(steps=4))
    seen = first_latents(model, SampleSettings(steps=4, tone_image=str(path)))
    ac = float(model.spec.schedule.alphas_cumprod[int(plain.t)])
    torch.testing.assert_close(seen.x, math.sqrt(ac) * leak + math.sqrt(1 - ac) * plain.x, atol=1e-6, rtol=1e-5)


def test_folder_statistics_are_fitted_saved_and_drawn_per_sample(model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, colour in enumerate([(250, 250, 250), (10, 10, 10), (200, 40, 90), (30, 200, 60), (90, 90, 250)]):
        write_gradient(folder / f"{i}.png", colour=colour)
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"data .*nowhere: not a directory"):
        tones.fit_stats(model, tmp_path / "nowhere", 16, progress=False)
    resolution = model.unet.config.sample_size * model.vae_scale_factor
    stats, count, skipped = tones.fit_stats(model, folder, resolution, progress=False)
    assert count == 5
    assert [p.path.name for p in skipped] == ["broken.png"]
    assert stats.channels == model.unet.config.in_channels and stats.mean.numel() == stats.channels * stats.k**2
    path = tmp_path / "tone.safetensors"
    tones.save_stats(path, stats, model, 5)
    loaded = tones.load_stats(path)
    torch.testing.assert_close(loaded.covariance, stats.covariance)
    size = (model.unet.config.sample_size,) * 2
    leaks = tones.leak_for(model, size, [3, 4], tone_stats=str(path))
    assert leaks.shape == (2, stats.channels, *size) and not torch.equal(leaks[0], leaks[1])
    torch.testing.assert_close(tones.leak_for(model, size, [3, 4], tone_stats=str(path)), leaks)  # seeded
    plain = first_latents(model, SampleSettings(steps=4, seed=3))
    seen = first_latents(model, SampleSettings(steps=4, seed=3, tone_stats=str(path)))
    ac = float(model.spec.schedule.alphas_cumprod[int(plain.t)])
    torch.testing.assert_close(seen.x, math.sqrt(ac) * leaks + math.sqrt(1 - ac) * plain.x, atol=1e-6, rtol=1e-5)


def test_a_file_that_is_not_tone_statistics_is_named(tmp_path, tiny_sd):
    other = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file

    save_file({"mean": torch.zeros(3)}, other)
    with pytest.raises(ConfigError, match=r"tone_stats .*weights.safetensors: not a tone statistics file"):
        tones.load_stats(other)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ConfigError, match=r"junk.safetensors: unreadable"):
        tones.load_stats(tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError, match=r"tone_stats .*missing.safetensors: no such file"):
        tones.load_stats(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_cli_tone_stats_then_sample_with_each_source(family, request, tmp_path):
    tiny_sd = request.getfixturevalue("tiny_sd" if family == "sd" else "tiny_sdxl")
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, colour in enumerate([(250, 250, 250), (10, 10, 10), (200, 40, 90)]):
        write_gradient(folder / f"{i}.png", colour=colour)
    (folder / "notes.png").write_text("not an image")
    stats = tmp_path / "tones.safetensors"
    result = runner.invoke(app, ["tone-stats", "--model", str(tiny_sd), "--data", str(folder), "--out", str(stats)])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and "notes.png" in result.output
    side = load_stable_diffusion(tiny_sd).unet.config.sample_size * 2
    assert f"wrote {stats}: 3 images at {side} px, 3×3 DCT coefficients of 4 latent channels" in result.output
    base = ["sample", "--model", str(tiny_sd), "--prompt", "night", "--steps", "3", "--num-images", "2"]
    images = {}
    for name, extra in {
        "plain": [],
        "tone": ["--tone", "#000000"],
        "image": ["--tone-image", str(folder / "2.png")],
        "stats": ["--tone-stats", str(stats)],
    }.items():
        out = tmp_path / name
        result = runner.invoke(app, [*base, "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        images[name] = np.asarray(Image.open(out / "000001-night.png"), dtype=np.float64)
        info = json.loads(Image.open(out / "000001-night.png").text["fullrange"])
        assert {"tone": "#000000", "image": None, "stats": None, "plain": None}[name] == info["tone"]
    for name in ("tone", "image", "stats"):
        assert np.abs(images[name] - images["plain"]).max() > 0, name  # the same seed, another start


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tone", "2"], "--tone '2' is neither a brightness in [0, 1] nor a colour like #1a1a1a"),
        (["--tone", "0.1", "--tone-image", "x.png"], "--tone-image is a second source of tone: give only one"),
        (["--tone-image", "missing.png"], "--tone-image missing.png: no such file"),
        (["--tone-stats", "missing.safetensors"], "--tone-stats missing.safetensors: no such file"),
    ],
)
def test_cli_bad_tones_are_named(tiny_sd, tmp_path, extra, message):
    result = runner.invoke(app, ["sample", "--model", str(tiny_sd), "--prompt", "x", "--out", str(tmp_path), *extra])
    assert result.exit_code == 2 and message in result.output, result.output


def test_cli_a_tone_at_zero_terminal_snr_says_how_it_acts(tiny_sd, tmp_path):
    ztsnr = tmp_path / "ztsnr"
    shutil.copytree(tiny_sd, ztsnr)
    config_path = ztsnr / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config |= {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    config_path.write_text(json.dumps(config))
    args = ["sample", "--model", str(ztsnr), "--prompt", "x", "--steps", "3"]
    plain = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    toned = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--tone", "0"])
    assert toned.exit_code == 0, toned.output
    said = "note: the first step (t = 999) is at zero SNR, where nothing leaks: the tone replaces the lowest"
    assert said in toned.output and "zero SNR" not in plain.output and "warning" not in toned.output
    # What it picked for a zero-terminal-SNR model, said once: DDIM on trailing steps.
    assert plain.output.count("note: fullrange picked sampler ddim and trailing steps from pure noise") == 1, (
        plain.output
    )
    images = [np.asarray(Image.open(tmp_path / f / "000000-x.png")) for f in ("a", "b")]
    assert not np.array_equal(*images)


def test_cli_eval_brightness_compares_with_and_without_the_tone(tiny_sd, tmp_path):
    args = ["eval", "brightness", "--model", str(tiny_sd), "--out", str(tmp_path), "--steps", "2", "--num-images", "1"]
    result = runner.invoke(app, [*args, "--tone", "0.0"])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "brightness.json").read_text())
    assert sorted(results) == [tiny_sd.name, f"{tiny_sd.name} + tone 0.0"]
    a, b = (results[k]["prompts"]["A dark alley in the rain"]["mean_brightness"] for k in sorted(results))
    assert a != b
    # The guidance shaping reaches eval too: APG without the parallel part measures another brightness.
    shaped = runner.invoke(app, [*args[:5], str(tmp_path / "apg"), *args[6:], "--apg-eta", "0"])
    assert shaped.exit_code == 0, shaped.output
    c = json.loads((tmp_path / "apg" / "brightness.json").read_text())[tiny_sd.name]
    assert c["prompts"]["A dark alley in the rain"]["mean_brightness"] != a


def test_tone_stats_needs_no_captions(tiny_sd, tmp_path):
    from typer.testing import CliRunner

    from fullrange.cli import app

    (tmp_path / "photos").mkdir()
    for i, value in enumerate((10, 240)):
        Image.fromarray(np.full((16, 16, 3), value, dtype=np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    args = ["tone-stats", "--model", str(tiny_sd), "--data", str(tmp_path / "photos")]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "t.safetensors"), "--no-progress"])
    assert result.exit_code == 0 and "2 images" in result.output, result.output
