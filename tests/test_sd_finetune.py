"""Fine-tuning and sampling a tiny Stable Diffusion built from configs (no downloads)."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from peft import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from fullrange import data, sd
from fullrange.cli import app
from fullrange.sd_finetune import FinetuneOptions, encode_captions, encode_latents, finetune, read_options
from fullrange.sd_sample import SampleSettings, apply_adapter, generate

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    sd.save_tiny_stable_diffusion(root / "sd")
    (root / "data").mkdir()
    for i, (value, caption) in enumerate(
        [(0, "solid black"), (255, "solid white"), (40, "a dark scene"), (215, "a bright scene")]
    ):
        Image.fromarray(np.full((20, 24, 3), value, dtype=np.uint8)).save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text(caption)
    return root


def _options(workspace, out, **changes):
    base = {
        "model": str(workspace / "sd"),
        "data": str(workspace / "data"),
        "out": str(workspace / out),
        "resolution": 16,
        "max_steps": 3,
        "batch_size": 2,
        "lr": 1e-3,
        "checkpoint_every": 2,
    }
    return FinetuneOptions(**(base | changes)).validate()


PROMPTS = ["solid black", "a bright scene"]


def test_lora_with_zero_terminal_snr_loads_in_diffusers_and_matches(workspace, diffusers_images):
    outputs = finetune(
        _options(workspace, "lora", adapter="lora", zero_terminal_snr=True), progress=False, log=lambda _: None
    )
    config = json.loads((outputs["lora"] / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"]
    assert config["timestep_spacing"] == "trailing"

    pipe = StableDiffusionPipeline.from_pretrained(workspace / "sd", local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_pretrained(outputs["lora"])
    pipe.load_lora_weights(outputs["lora"])
    pipe.set_progress_bar_config(disable=True)
    # Every trained LoRA weight, attention and ResNet layers alike, arrives in diffusers' UNet.
    saved = load_file(outputs["lora"] / "pytorch_lora_weights.safetensors")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="default_0")
    assert {f"unet.{k}" for k in loaded} == set(saved) and any(".attn2.to_k." in k for k in saved)
    assert all(torch.equal(loaded[k.removeprefix("unet.")], v) for k, v in saved.items())
    theirs = diffusers_images(pipe, PROMPTS, steps=5, guidance=3.0)

    model = sd.load_stable_diffusion(workspace / "sd")
    apply_adapter(model, outputs["lora"])
    assert model.prediction == "v_prediction" and model.schedule.zero_terminal_snr
    ours = generate(model, PROMPTS, SampleSettings(sampler="ddim", steps=5, guidance=3.0))
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)

    # The adapter changed something: without it the same settings give other images.
    plain = sd.load_stable_diffusion(workspace / "sd")
    plain.scheduler_config, plain.prediction, plain.schedule = model.scheduler_config, model.prediction, model.schedule
    assert (generate(plain, PROMPTS, SampleSettings(sampler="ddim", steps=5, guidance=3.0)) - ours).abs().max() > 1e-4


def test_full_fine_tune_with_offset_noise_saves_a_pipeline(workspace, diffusers_images):
    outputs = finetune(
        _options(workspace, "full", adapter="full", offset_noise=0.1), progress=False, log=lambda _: None
    )
    pipe = StableDiffusionPipeline.from_pretrained(outputs["pipeline"], local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.scheduler.config.set_alpha_to_one
    base = load_file(workspace / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    tuned = load_file(outputs["pipeline"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    pipe.set_progress_bar_config(disable=True)
    theirs = diffusers_images(pipe, PROMPTS, steps=5, guidance=3.0)
    ours = generate(sd.load_stable_diffusion(outputs["pipeline"]), PROMPTS, SampleSettings(steps=5, guidance=3.0))
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)
    saved = json.loads((workspace / "full" / "config.json").read_text())
    assert saved["options"]["offset_noise"] == 0.1 and saved["recipe"]["noise"] == "offset"


def test_oft_saves_the_adapter_and_a_merged_pipeline(workspace):
    outputs = finetune(_options(workspace, "oft", adapter="oft", oft_block_size=4), progress=False, log=lambda _: None)
    adapter = load_file(outputs["oft"] / "adapter_model.safetensors")
    assert adapter and all("oft_" in k for k in adapter)
    base = load_file(workspace / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    merged = load_file(outputs["pipeline"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert set(merged) == set(base)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert any(k.endswith("attn1.to_q.weight") for k in changed)
    assert not any(".conv1." in k or ".conv2." in k for k in changed)  # 3×3 convolutions are left alone


def test_train_cli_config_file_overrides_and_resume(workspace, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'model = "{workspace / "sd"}"\ndata = "{workspace / "data"}"\nresolution = 16\n'
        'max-steps = 2\nbatch-size = 2\nadapter = "lora"\nlora-rank = 2\n'
    )
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train", "--config", str(toml), "--out", str(out), "--lora-rank", "3", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())["options"]
    assert saved["lora_rank"] == 3 and saved["max_steps"] == 2 and saved["resolution"] == 16
    again = runner.invoke(app, ["train", "--config", str(toml), "--out", str(out), "--no-progress"])
    assert again.exit_code == 2 and "pass --resume" in again.output
    resumed = runner.invoke(
        app, ["train", "--config", str(toml), "--out", str(out), "--lora-rank", "3", "--resume", "--no-progress"]
    )
    assert resumed.exit_code == 0, resumed.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--adapter", "dora"], "--adapter 'dora'"),
        (["--resolution", "12"], "--resolution must be a multiple of 8"),
        (["--max-steps", "0"], "--max-steps must be positive"),
        (["--offset-noise", "0.1", "--pyramid-noise", "0.8"], "alternatives"),
    ],
)
def test_train_cli_bad_options(workspace, tmp_path, args, message):
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            str(workspace / "sd"),
            "--data",
            str(workspace / "data"),
            "--out",
            str(tmp_path / "o"),
            *args,
        ],
    )
    assert result.exit_code == 2 and message in result.output
    assert result.output.strip().count("\n") == 0


def test_read_options_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 'blue'\n")
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        read_options(bad, {})
    with pytest.raises(ValueError, match="missing --model, --data, --out"):
        read_options(None, {})


def test_zero_terminal_snr_with_epsilon_is_refused(workspace):
    with pytest.raises(ValueError, match="zero terminal SNR with epsilon"):
        finetune(
            _options(workspace, "bad", zero_terminal_snr=True, prediction="epsilon"), progress=False, log=lambda _: None
        )


def test_sample_cli_writes_pngs_with_settings(workspace, tmp_path):
    result = runner.invoke(
        app,
        [
            "sample",
            "--model",
            str(workspace / "sd"),
            "--prompt",
            "solid black",
            "--prompt",
            "a white background",
            "--out",
            str(tmp_path),
            "--steps",
            "3",
            "--sampler",
            "dpmpp_2m",
            "--num-images",
            "2",
            "--resolution",
            "16",
        ],
    )
    assert result.exit_code == 0, result.output
    pngs = sorted(tmp_path.glob("0*.png"))
    assert len(pngs) == 4 and (tmp_path / "grid.png").exists()
    info = json.loads(Image.open(pngs[3]).text["fullrange"])
    assert info["prompt"] == "a white background" and info["sampler"] == "dpmpp_2m" and info["seed"] == 3
    bad = runner.invoke(
        app, ["sample", "--model", str(workspace / "sd"), "--prompt", "x", "--out", str(tmp_path), "--sampler", "plms"]
    )
    assert bad.exit_code == 2 and "--sampler 'plms' is unknown" in bad.output


def test_eval_brightness_compares_two_models(workspace, tmp_path):
    result = runner.invoke(
        app,
        [
            "eval",
            "brightness",
            "--model",
            str(workspace / "sd"),
            "--against",
            str(workspace / "sd"),
            "--out",
            str(tmp_path),
            "--steps",
            "2",
            "--num-images",
            "1",
            "--resolution",
            "16",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "brightness.json").read_text())
    assert list(report) == ["sd", "sd (against)"]
    prompts = report["sd"]["prompts"]
    assert "Solid black background" in prompts and "A dark alley in the rain" in prompts
    for stats in prompts.values():
        assert 0 <= stats["mean_brightness"] <= 1 and 0 <= stats["near_black"] <= 1
    # Same model, same seeds: the same numbers.
    assert report["sd"]["prompts"] == report["sd (against)"]["prompts"]
    assert (tmp_path / "brightness.png").read_bytes()[:4] == b"\x89PNG"


def test_validation_images_at_each_checkpoint_with_accumulation(workspace):
    options = _options(
        workspace,
        "val",
        max_steps=4,
        checkpoint_every=2,
        grad_accum=2,
        gradient_checkpointing=True,
        validation_prompts=("solid black", "a white background"),
    )
    finetune(options, progress=False, log=lambda _: None)
    steps = sorted(p.name for p in (workspace / "val" / "validation").iterdir())
    assert steps == ["step_000002", "step_000004"]
    image = Image.open(workspace / "val" / "validation" / "step_000004" / "0001.png")
    assert image.size == (16, 16) and json.loads(image.text["fullrange"])["prompt"] == "a white background"


def test_latents_and_caption_states_are_cached(workspace, tmp_path):
    cache = workspace / "lora" / "cache"
    latents = sorted(cache.glob("latent_*.safetensors"))
    texts = sorted(cache.glob("text_*.safetensors"))
    assert len(latents) == 4 and len(texts) == 1
    states = load_file(texts[0])
    model = sd.load_stable_diffusion(workspace / "sd")
    torch.testing.assert_close(
        states["encoder_hidden_states"][-1:], model.encode_prompts([""])["encoder_hidden_states"]
    )
    # Encoding again reads the cache: the same values, files untouched.
    before = {p: p.stat().st_mtime_ns for p in latents + texts}
    items, _ = data.scan(workspace / "data", 16)
    means, _ = encode_latents(model, items, 16, cache, progress=False)
    fresh, _ = encode_latents(model, items, 16, tmp_path / "fresh", progress=False)
    torch.testing.assert_close(means, fresh)
    torch.testing.assert_close(encode_captions(model, [i.caption for i in items], cache), states)
    assert {p: p.stat().st_mtime_ns for p in latents + texts} == before


def test_dreambooth_prior_preservation_generates_and_uses_class_images(workspace):
    lines = []
    options = _options(
        workspace,
        "dreambooth",
        adapter="lora",
        class_prompt="a photo of a scene",
        num_class_images=3,
        prior_loss_weight=0.5,
        max_steps=2,
    )
    finetune(options, progress=False, log=lines.append)
    class_dir = workspace / "dreambooth" / "class_images"
    assert sorted(p.name for p in class_dir.glob("*.png")) == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert (class_dir / "class_00001.txt").read_text() == "a photo of a scene"
    assert any("prior preservation: 3 class images" in line for line in lines)
    # Given class images are used as they are, captioned with the class prompt.
    given = FinetuneOptions(
        **{
            **options.__dict__,
            "out": str(workspace / "dreambooth2"),
            "num_class_images": 0,
            "class_data": str(workspace / "data"),
        }
    )
    lines.clear()
    finetune(given, progress=False, log=lines.append)
    assert any("prior preservation: 4 class images" in line for line in lines)
    assert not (workspace / "dreambooth2" / "class_images").exists()


def test_class_prompt_needs_class_images(workspace):
    with pytest.raises(ValueError, match="--class-prompt needs --class-data"):
        _options(workspace, "x", class_prompt="a dog")
    with pytest.raises(ValueError, match="prior preservation needs --class-prompt"):
        _options(workspace, "x", num_class_images=4)


def test_oft_adapter_in_sample_matches_the_merged_pipeline_and_scales(workspace):
    oft_dir, merged_dir = workspace / "oft" / "oft", workspace / "oft" / "pipeline"
    if not oft_dir.exists():
        finetune(_options(workspace, "oft", adapter="oft", oft_block_size=4), progress=False, log=lambda _: None)
    settings = SampleSettings(steps=4, guidance=3.0)
    merged = generate(sd.load_stable_diffusion(merged_dir), PROMPTS, settings)
    adapted = sd.load_stable_diffusion(workspace / "sd")
    apply_adapter(adapted, oft_dir)
    torch.testing.assert_close(generate(adapted, PROMPTS, settings), merged, atol=2e-4, rtol=0)
    off = sd.load_stable_diffusion(workspace / "sd")
    apply_adapter(off, oft_dir, strength=0.0)
    base = generate(sd.load_stable_diffusion(workspace / "sd"), PROMPTS, settings)
    torch.testing.assert_close(generate(off, PROMPTS, settings), base, atol=1e-6, rtol=0)


def test_lora_strength_zero_is_the_base_model(workspace):
    lora_dir = workspace / "lora" / "lora"
    if not lora_dir.exists():
        finetune(
            _options(workspace, "lora", adapter="lora", zero_terminal_snr=True), progress=False, log=lambda _: None
        )
    settings = SampleSettings(steps=3, guidance=3.0)
    off = sd.load_stable_diffusion(workspace / "sd")
    apply_adapter(off, lora_dir, strength=0.0)
    base = sd.load_stable_diffusion(workspace / "sd")
    base.scheduler_config, base.prediction, base.schedule = off.scheduler_config, off.prediction, off.schedule
    torch.testing.assert_close(generate(off, PROMPTS, settings), generate(base, PROMPTS, settings), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="neither a LoRA"):
        apply_adapter(base, workspace / "data")


def test_buckets_keep_aspect_ratios(workspace, tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    for i, (w, h) in enumerate([(40, 20), (42, 22), (20, 40), (30, 30)]):
        Image.fromarray(np.full((h, w, 3), 60 * i, dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"image {i}")
    options = FinetuneOptions(
        model=str(workspace / "sd"),
        data=str(folder),
        out=str(tmp_path / "out"),
        resolution=16,
        max_steps=4,
        batch_size=2,
        buckets=True,
        checkpoint_every=10,
    ).validate()
    finetune(options, progress=False, log=lambda _: None)
    shapes = sorted({tuple(load_file(p)["mean"].shape) for p in (tmp_path / "out" / "cache").glob("latent_*")})
    # (20, 12), (16, 16) and (12, 20) pixel buckets, as latents at half size.
    assert shapes == [(4, 6, 10), (4, 8, 8), (4, 10, 6)]


def test_config_file_values_are_type_checked(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "m"\ndata = "d"\nout = "o"\nresolution = "big"\n')
    with pytest.raises(ValueError, match="option resolution must be int, got 'big'"):
        read_options(bad, {})
    ok = tmp_path / "ok.toml"
    ok.write_text('model = "m"\ndata = "d"\nout = "o"\nlr = 1\noffset-noise = 0.1\n')
    options = read_options(ok, {})
    assert options.lr == 1.0 and isinstance(options.lr, float) and options.offset_noise == 0.1


def test_export_merges_a_lora_and_marks_its_sampling(workspace, tmp_path):
    """`fullrange export --adapter` writes one file whose UNet is the LoRA merged in, with v_pred / ztsnr keys
    from the adapter's scheduler config; it reloads as a v-prediction, zero-terminal-SNR model."""
    from fullrange import single_file

    path = tmp_path / "merged.safetensors"
    args = ["export", "--model", str(workspace / "sd"), "--adapter", str(workspace / "lora" / "lora")]
    result = runner.invoke(app, [*args, "--out", str(path), "--family", "sd1", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert single_file.markers(single_file.read_header(path)) == {"v_prediction": True, "zero_terminal_snr": True}
    merged = sd.load_stable_diffusion(path, config=workspace / "sd")
    assert merged.prediction == "v_prediction" and merged.schedule.zero_terminal_snr
    adapted = sd.load_stable_diffusion(workspace / "sd")
    apply_adapter(adapted, workspace / "lora" / "lora")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 500.0])
    cond = adapted.encode_prompts(PROMPTS)
    torch.testing.assert_close(merged.unet(x, t, **cond).sample, adapted.unet(x, t, **cond).sample, atol=1e-5, rtol=0)


def test_bf16_mixed_precision_trains_with_fp32_master_weights(workspace, tmp_path):
    """bf16 autocast (accelerate, here on the CPU) changes the losses by rounding only and keeps the trained
    weights in float32. Each precision runs in its own process: accelerate keeps one per process, and a second
    in the same process is refused with a one-line reason."""
    import subprocess
    import sys

    from fullrange import checkpoint, models, train

    args = [sys.executable, "-m", "fullrange", "train", "--model", str(workspace / "sd")]
    args += ["--data", str(workspace / "data"), "--resolution", "16", "--max-steps", "3", "--batch-size", "4"]
    args += ["--lr", "1e-3", "--caption-dropout", "0", "--no-progress"]
    logs = {}
    for precision in ("no", "bf16"):
        run = subprocess.run(
            [*args, "--mixed-precision", precision, "--out", str(tmp_path / precision)], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr[-2000:]
        saved = checkpoint.load_checkpoint(tmp_path / precision / "train" / "checkpoint.safetensors")
        assert {v.dtype for v in saved.model.values()} == {torch.float32}
        logs[precision] = saved.log["loss"]
    assert torch.allclose(logs["bf16"], logs["no"], rtol=0.05) and not torch.equal(logs["bf16"], logs["no"])

    config = train.TrainConfig(steps=1, batch_size=2, warmup=1)
    images = torch.zeros(4, 3, 8, 8)
    batches = train.labelled_batches(images, torch.zeros(4, dtype=torch.long), 1)
    model = models.tiny_unet(8, 3, width=8)
    train.train(model, batches, train.get_recipe("baseline"), config, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="one precision per process"):
        bf16 = train.TrainConfig(steps=1, batch_size=2, warmup=1, mixed_precision="bf16")
        train.train(model, batches, train.get_recipe("baseline"), bf16, tmp_path / "b", progress=False)
