"""Fine-tuning and sampling a tiny Stable Diffusion built from configs (no downloads)."""

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from peft import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from fullrange import data
from fullrange.cli import app
from fullrange.sampling import DEFAULT_SAMPLER
from fullrange.sd import load_adapter, load_stable_diffusion
from fullrange.sd.config import finetune_config, merge
from fullrange.sd.finetune import finetune
from fullrange.sd.latents import encode_captions, encode_latents
from fullrange.sd.sample import SampleSettings, generate
from fullrange.sd.testing import save_tiny_stable_diffusion

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    save_tiny_stable_diffusion(root / "sd")
    (root / "data").mkdir()
    for i, (value, caption) in enumerate(
        [(0, "solid black"), (255, "solid white"), (40, "a dark scene"), (215, "a bright scene")]
    ):
        Image.fromarray(np.full((20, 24, 3), value, dtype=np.uint8)).save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text(caption)
    return root


def _config(workspace, out, **tables):
    """A fine-tune of the tiny SD on the workspace's images, 3 steps at 16×16; ``tables`` change any table."""
    base = {
        "model": {"path": str(workspace / "sd")},
        "data": {"path": str(workspace / "data"), "resolution": 16},
        "output": {"path": str(workspace / out)},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 2},
    }
    return finetune_config(merge(base, tables))


PROMPTS = ["solid black", "a bright scene"]


@pytest.fixture(scope="module")
def lora_run(workspace) -> dict:
    """The outputs of a LoRA fine-tune with zero terminal SNR into ``workspace/lora``, made once for the module."""
    tables = {"adapter": {"kind": "lora"}, "noise": {"zero_terminal_snr": True}, "output": {"family": "sd1"}}
    return finetune(_config(workspace, "lora", **tables), progress=False, log=lambda _: None)


def test_lora_with_zero_terminal_snr_loads_in_diffusers_and_matches(workspace, lora_run, diffusers_images):
    outputs = lora_run
    # The kohya file beside the LoRA folder holds the same weights, in kohya's names.
    with safe_open(outputs["kohya"], "pt") as f:
        kohya, meta = set(f.keys()), f.metadata()
    saved_count = len(load_file(outputs["lora"] / "pytorch_lora_weights.safetensors"))
    assert (
        len([k for k in kohya if not k.endswith(".alpha")]) == saved_count and meta["ss_v_parameterization"] == "True"
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

    model = load_adapter(load_stable_diffusion(workspace / "sd"), outputs["lora"])
    assert model.spec.prediction == "v_prediction" and model.spec.schedule.zero_terminal_snr
    ours = generate(
        model, PROMPTS, SampleSettings(sampler="ddim", steps=5, spacing="trailing", guidance=3.0, guidance_rescale=0.0)
    )
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)

    # The adapter changed something: without it the same settings give other images.
    plain = replace(load_stable_diffusion(workspace / "sd"), spec=model.spec)
    assert (
        generate(
            plain,
            PROMPTS,
            SampleSettings(sampler="ddim", steps=5, spacing="trailing", guidance=3.0, guidance_rescale=0.0),
        )
        - ours
    ).abs().max() > 1e-4


def test_full_fine_tune_with_offset_noise_saves_a_pipeline(workspace, diffusers_images):
    config = _config(workspace, "full", adapter={"kind": "full"}, noise={"offset": 0.1})
    umask = os.umask(0o022)  # every output readable by a ComfyUI or A1111 running as another user
    try:
        outputs = finetune(config, progress=False, log=lambda _: None)
    finally:
        os.umask(umask)
    written = [outputs["pipeline"] / "unet" / "diffusion_pytorch_model.safetensors"]
    written += [workspace / "full" / "train" / "checkpoint.safetensors", workspace / "full" / "config.json"]
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {"0o644"}
    pipe = StableDiffusionPipeline.from_pretrained(outputs["pipeline"], local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.scheduler.config.set_alpha_to_one
    base = load_file(workspace / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    tuned = load_file(outputs["pipeline"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    pipe.set_progress_bar_config(disable=True)
    theirs = diffusers_images(pipe, PROMPTS, steps=5, guidance=3.0)
    ours = generate(
        load_stable_diffusion(outputs["pipeline"]),
        PROMPTS,
        SampleSettings(sampler="ddim", steps=5, spacing=pipe.scheduler.config.timestep_spacing, guidance=3.0),
    )
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)
    saved = json.loads((workspace / "full" / "config.json").read_text())
    assert saved["config"]["noise"]["offset"] == 0.1 and saved["recipe"]["noise"] == "offset"
    card = outputs["card"].read_text()  # a full fine-tune is sampled from its pipeline, an epsilon model
    assert f"fullrange sample --model {outputs['pipeline']} --prompt" in card and "**epsilon** model." in card
    assert f'Pipeline.from_pretrained("{outputs["pipeline"]}")' in card and "ModelSamplingDiscrete" in card


def test_oft_saves_the_adapter_and_a_merged_pipeline(workspace):
    config = _config(workspace, "oft", adapter={"kind": "oft", "block_size": 4})
    outputs = finetune(config, progress=False, log=lambda _: None)
    adapter = load_file(outputs["oft"] / "adapter_model.safetensors")
    assert adapter and all("oft_" in k for k in adapter)
    base = load_file(workspace / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    merged = load_file(outputs["pipeline"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert set(merged) == set(base)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert any(k.endswith("attn1.to_q.weight") for k in changed)
    assert not any(".conv1." in k or ".conv2." in k for k in changed)  # 3×3 convolutions are left alone


def test_train_cli_flat_config_file_overrides_and_resume(workspace, tmp_path):
    """A flat TOML file spelled as the flags (as before the tables) still works; flags override it."""
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'model = "{workspace / "sd"}"\ndata = "{workspace / "data"}"\nresolution = 16\n'
        'max-steps = 2\nbatch_size = 2\nadapter = "lora"\nlora-rank = 2\nvalidation-prompts = []\n'
    )
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train", "--config", str(toml), "--out", str(out), "--lora-rank", "3", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["adapter"]["rank"] == 3 and saved["train"]["steps"] == 2 and saved["data"]["resolution"] == 16
    again = runner.invoke(app, ["train", "--config", str(toml), "--out", str(out), "--no-progress"])
    assert again.exit_code == 2 and "pass --resume" in again.output
    resumed = runner.invoke(
        app, ["train", "--config", str(toml), "--out", str(out), "--lora-rank", "3", "--resume", "--no-progress"]
    )
    assert resumed.exit_code == 0, resumed.output


def test_train_cli_nested_config_file(workspace, tmp_path):
    """The tables of a nested TOML file are the config's tables; flags still override them."""
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'[model]\npath = "{workspace / "sd"}"\n[data]\npath = "{workspace / "data"}"\nresolution = 16\n'
        '[noise]\nzero_terminal_snr = true\n[adapter]\nkind = "lora"\nrank = 2\n'
        "[train]\nsteps = 2\nbatch_size = 2\nwarmup = 1\n"
    )
    out = tmp_path / "nested"
    result = runner.invoke(
        app, ["train", "--config", str(toml), "--out", str(out), "--max-steps", "1", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["train"] == saved["config"]["train"] | {"steps": 1, "batch_size": 2, "warmup": 1}
    assert saved["recipe"]["spec"]["prediction"] == "v_prediction" and saved["config"]["adapter"]["rank"] == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["--adapter", "dora"], "--adapter 'dora' is not one of full, lora, oft"),
        (["--resolution", "12"], "--resolution must be a multiple of 8"),
        (["--max-steps", "0"], "--max-steps must be positive"),
        (["--lora-rank", "0"], "--lora-rank must be positive"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--offset-noise", "0.1", "--pyramid-noise", "0.8"], "--offset-noise and --pyramid-noise are alternatives"),
        (["--zero-terminal-snr", "--prediction", "epsilon"], "--prediction epsilon with zero terminal SNR"),
        (["--sha256", "abc"], "--sha256 'abc': not 64 hex digits"),
    ],
)
def test_train_cli_bad_options(workspace, tmp_path, args, message):
    """Every bad option is one line naming the flag, before anything is loaded."""
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
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.strip().count("\n") == 0
    assert not (tmp_path / "o").exists()


def test_train_cli_data_problems_name_the_flag_once(workspace, tmp_path):
    """An error found while loading (here a missing data folder) names its flag, once."""
    args = ["train", "--model", str(workspace / "sd"), "--out", str(tmp_path / "o"), "--no-progress"]
    result = runner.invoke(app, [*args, "--data", str(tmp_path / "none")])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2 and last == f"error: --data {tmp_path / 'none'}: not a directory"


def test_library_errors_speak_config_terms(workspace, tmp_path):
    base = {"model": {"path": "m"}, "data": {"path": "d"}, "output": {"path": "o"}}
    with pytest.raises(ValueError, match=r"^adapter\.rank must be positive, got 0$"):
        finetune_config(merge(base, {"adapter": {"rank": 0}}))
    with pytest.raises(ValueError, match=r"^train\.steps must be int, got 'many'$"):
        finetune_config(merge(base, {"train": {"steps": "many"}}))
    with pytest.raises(ValueError, match=r"^noise\.colour is not an option"):
        finetune_config(merge(base, {"noise": {"colour": 1}}))
    with pytest.raises(ValueError, match=r"^model\.path is required$"):
        finetune_config({"data": {"path": "d"}, "output": {"path": "o"}})
    config = _config(workspace, "missing", model={"path": str(tmp_path / "nothing")})
    with pytest.raises(ValueError, match=r"^model\.path .*nothing: no such file or directory$"):
        finetune(config, progress=False, log=lambda _: None)
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 'blue'\n")
    result = runner.invoke(app, ["train", "--config", str(bad)])
    assert result.exit_code == 2 and f"--config {bad}: unknown option 'colour'" in result.output
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2 and "--model is required (on the command line or in --config)" in result.output


def test_a_linear_schedule_checkpoint_fine_tunes_on_its_own_schedule(workspace, tmp_path):
    """The recipe keeps the schedule the loader read (here DDPM's linear betas), rescaled for zero terminal SNR,
    and the saved scheduler config names it."""
    import shutil

    folder = shutil.copytree(workspace / "sd", tmp_path / "linear")
    config_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(config_path.read_text()) | {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    config_path.write_text(json.dumps(scheduler))
    config = _config(workspace, "linear_run", model={"path": str(folder)}, noise={"zero_terminal_snr": True})
    outputs = finetune(config, progress=False, log=lambda _: None)
    saved = DDIMScheduler.from_pretrained(outputs["lora"])
    assert saved.config.beta_schedule == "linear" and saved.config.rescale_betas_zero_snr
    reference = DDIMScheduler(beta_schedule="linear", rescale_betas_zero_snr=True).alphas_cumprod
    torch.testing.assert_close(saved.alphas_cumprod, reference)


def test_zero_terminal_snr_with_epsilon_is_refused(workspace):
    with pytest.raises(ValueError, match=r"noise\.prediction epsilon with zero terminal SNR"):
        _config(workspace, "bad", noise={"zero_terminal_snr": True, "prediction": "epsilon"})


def test_sample_cli_writes_pngs_with_settings(workspace, tmp_path):
    args = [
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
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    pngs = sorted(tmp_path.glob("0*.png"))
    assert [p.name for p in pngs] == [
        "000000-solid-black.png",
        "000001-solid-black.png",
        "000002-a-white-background.png",
        "000003-a-white-background.png",
    ]
    assert (tmp_path / "grid-000000.png").exists()
    first = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    again = runner.invoke(app, args)  # the same command into the same folder: new names, nothing overwritten
    assert again.exit_code == 0, again.output
    assert all((tmp_path / name).read_bytes() == data for name, data in first.items())
    assert (tmp_path / "000000-solid-black-2.png").exists() and (tmp_path / "grid-000000-2.png").exists()
    info = json.loads(Image.open(pngs[3]).text["fullrange"])
    assert info["prompt"] == "a white background" and info["sampler"] == "dpmpp_2m" and info["seed"] == 3
    bad = runner.invoke(
        app, ["sample", "--model", str(workspace / "sd"), "--prompt", "x", "--out", str(tmp_path), "--sampler", "plms"]
    )
    assert bad.exit_code == 2 and "--sampler 'plms' is not one of ddim," in bad.output


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
    config = _config(
        workspace,
        "val",
        train={"steps": 4, "checkpoint_every": 2, "grad_accum": 2, "gradient_checkpointing": True},
        validation={"prompts": ["solid black", "a white background"]},
    )
    finetune(config, progress=False, log=lambda _: None)
    steps = sorted(p.name for p in (workspace / "val" / "validation").iterdir())
    assert steps == ["step_000002", "step_000004"]
    image = Image.open(workspace / "val" / "validation" / "step_000004" / "000001-a-white-background.png")
    assert image.size == (16, 16) and json.loads(image.text["fullrange"])["prompt"] == "a white background"


def test_latents_and_caption_states_are_cached(workspace, lora_run, tmp_path):
    cache = workspace / "lora" / "cache"
    latents = sorted(cache.glob("latent_*.safetensors"))
    texts = sorted(cache.glob("text_*.safetensors"))
    assert len(latents) == 4 and len(texts) == 1
    states = load_file(texts[0])
    model = load_stable_diffusion(workspace / "sd")
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
    data = {"class_prompt": "a photo of a scene", "num_class_images": 3, "prior_loss_weight": 0.5}
    config = _config(workspace, "dreambooth", data=data, train={"steps": 2})
    finetune(config, progress=False, log=lines.append)
    class_dir = workspace / "dreambooth" / "class_images"
    assert sorted(p.name for p in class_dir.glob("*.png")) == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert (class_dir / "class_00001.txt").read_text() == "a photo of a scene"
    assert any("prior preservation: 3 class images" in line for line in lines)
    # Given class images are used as they are, captioned with the class prompt.
    given = _config(
        workspace,
        "dreambooth2",
        data=data | {"num_class_images": 0, "class_data": str(workspace / "data")},
        train={"steps": 2},
    )
    lines.clear()
    finetune(given, progress=False, log=lines.append)
    assert any("prior preservation: 4 class images" in line for line in lines)
    assert not (workspace / "dreambooth2" / "class_images").exists()


def test_class_prompt_needs_class_images(workspace):
    with pytest.raises(ValueError, match=r"data\.class_prompt needs class_data DIR"):
        _config(workspace, "x", data={"class_prompt": "a dog"})
    with pytest.raises(ValueError, match=r"data\.class_prompt is needed for prior preservation"):
        _config(workspace, "x", data={"num_class_images": 4})


def test_oft_adapter_in_sample_matches_the_merged_pipeline_and_scales(workspace):
    oft_dir, merged_dir = workspace / "oft" / "oft", workspace / "oft" / "pipeline"
    if not oft_dir.exists():
        config = _config(workspace, "oft", adapter={"kind": "oft", "block_size": 4})
        finetune(config, progress=False, log=lambda _: None)
    settings = SampleSettings(steps=4, guidance=3.0)
    merged = generate(load_stable_diffusion(merged_dir), PROMPTS, settings)
    adapted = load_adapter(load_stable_diffusion(workspace / "sd"), oft_dir)
    torch.testing.assert_close(generate(adapted, PROMPTS, settings), merged, atol=2e-4, rtol=0)
    off = load_adapter(load_stable_diffusion(workspace / "sd"), oft_dir, strength=0.0)
    base = generate(load_stable_diffusion(workspace / "sd"), PROMPTS, settings)
    torch.testing.assert_close(generate(off, PROMPTS, settings), base, atol=1e-6, rtol=0)


def test_lora_strength_zero_is_the_base_model(workspace, lora_run):
    lora_dir = lora_run["lora"]
    settings = SampleSettings(steps=3, guidance=3.0)
    base = load_stable_diffusion(workspace / "sd")
    off = load_adapter(load_stable_diffusion(workspace / "sd"), lora_dir, strength=0.0)
    # Strength 0 is the epsilon base, sampled with the base's own settings, not as the LoRA's v-prediction.
    assert off.spec.prediction == base.spec.prediction == "epsilon" and not off.spec.schedule.zero_terminal_snr
    torch.testing.assert_close(generate(off, PROMPTS, settings), generate(base, PROMPTS, settings), atol=1e-6, rtol=0)
    with pytest.warns(UserWarning, match="at strength 0.5 it mixes two prediction types"):
        half = load_adapter(load_stable_diffusion(workspace / "sd"), lora_dir, strength=0.5)
    assert half.spec.prediction == "v_prediction"
    with pytest.raises(ValueError, match="neither a LoRA"):
        load_adapter(base, workspace / "data")


def test_inspect_names_an_adapter_that_changes_the_prediction_type(workspace, lora_run):
    from fullrange.sd.inspection import inspect

    lora_dir = lora_run["lora"]
    found = inspect(str(workspace / "sd"), str(lora_dir))
    assert (found.prediction, found.zero_terminal_snr, found.how["prediction"]) == ("v_prediction", True, "markers")
    assert [m.convention for m in found.found] == ["diffusers", "diffusers", "diffusers", "diffusers"]
    assert found.found[0].source == str(lora_dir / "scheduler_config.json")  # the adapter's come first
    assert "the adapter changes the prediction type from the base's epsilon to v_prediction" in found.notes[0]
    # What `fullrange sample` picks at zero terminal SNR, written out.
    assert found.settings == {"sampler": DEFAULT_SAMPLER, "steps": 25, "spacing": "trailing", "guidance_rescale": 0.7}


def test_buckets_keep_aspect_ratios(workspace, tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    for i, (w, h) in enumerate([(40, 20), (42, 22), (20, 40), (30, 30)]):
        Image.fromarray(np.full((h, w, 3), 60 * i, dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"image {i}")
    config = _config(
        workspace,
        "buckets",
        data={"path": str(folder), "buckets": True},
        output={"path": str(tmp_path / "out")},
        train={"steps": 4, "checkpoint_every": 10},
    )
    finetune(config, progress=False, log=lambda _: None)
    shapes = sorted({tuple(load_file(p)["mean"].shape) for p in (tmp_path / "out" / "cache").glob("latent_*")})
    # (20, 12), (16, 16) and (12, 20) pixel buckets, as latents at half size.
    assert shapes == [(4, 6, 10), (4, 8, 8), (4, 10, 6)]


def test_config_file_values_are_type_checked(workspace, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "m"\ndata = "d"\nout = "o"\nresolution = "big"\n')
    result = runner.invoke(app, ["train", "--config", str(bad)])
    assert result.exit_code == 2 and "--resolution must be int, got 'big'" in result.output
    config = _config(workspace, "typed", train={"lr": 1}, noise={"offset": 0.1})
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float) and config.noise.offset == 0.1


def test_export_merges_a_lora_and_marks_its_sampling(workspace, lora_run, tmp_path):
    """`fullrange export --adapter` writes one file whose UNet is the LoRA merged in, with v_pred / ztsnr keys
    from the adapter's scheduler config; it reloads as a v-prediction, zero-terminal-SNR model."""
    from fullrange.sd import markers, single_file
    from fullrange.sd.config import ModelConfig

    path = tmp_path / "merged.safetensors"
    args = ["export", "--model", str(workspace / "sd"), "--adapter", str(workspace / "lora" / "lora")]
    result = runner.invoke(app, [*args, "--out", str(path), "--family", "sd1", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    decision = markers.decide(markers.from_header(single_file.read_header(path), str(path)))
    assert (decision.prediction, decision.zero_terminal_snr) == ("v_prediction", True)
    merged = load_stable_diffusion(ModelConfig(str(path), config=str(workspace / "sd")))
    assert merged.spec.prediction == "v_prediction" and merged.spec.schedule.zero_terminal_snr
    adapted = load_adapter(load_stable_diffusion(workspace / "sd"), workspace / "lora" / "lora")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 500.0])
    cond = adapted.condition(adapted.encode_prompts(PROMPTS))
    torch.testing.assert_close(merged.unet(x, t, **cond).sample, adapted.unet(x, t, **cond).sample, atol=1e-5, rtol=0)


def test_bf16_mixed_precision_trains_with_fp32_master_weights(workspace, tmp_path):
    """bf16 autocast (accelerate, here on the CPU) changes the losses by rounding only and keeps the trained
    weights in float32. Each precision runs in its own process: accelerate keeps one per process, and a second
    in the same process is refused with a one-line reason."""
    import subprocess
    import sys

    from fullrange import batches, checkpoint, losses, models, train

    args = [sys.executable, "-m", "fullrange", "train", "--model", str(workspace / "sd")]
    args += ["--data", str(workspace / "data"), "--resolution", "16", "--max-steps", "3", "--batch-size", "4"]
    args += ["--lr", "1e-3", "--caption-dropout", "0", "--no-progress"]
    logs = {}
    for precision in ("no", "bf16"):
        run = subprocess.run(
            [*args, "--mixed-precision", precision, "--out", str(tmp_path / precision)], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr[-2000:]
        saved = checkpoint.Checkpoint(tmp_path / precision / "train" / "checkpoint.safetensors")
        assert {v.dtype for v in saved.group("model").values()} == {torch.float32}
        logs[precision] = saved.group("log")["loss"]
    assert torch.allclose(logs["bf16"], logs["no"], rtol=0.05) and not torch.equal(logs["bf16"], logs["no"])

    config = train.TrainConfig(steps=1, batch_size=2, warmup=1)
    images = torch.zeros(4, 3, 8, 8)
    labelled = batches.labelled(images, torch.zeros(4, dtype=torch.long), 1)
    model = models.tiny_unet(8, 3, width=8)
    train.train(model, labelled, losses.get_recipe("baseline"), config, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="one precision per process"):
        bf16 = train.TrainConfig(steps=1, batch_size=2, warmup=1, mixed_precision="bf16")
        train.train(model, labelled, losses.get_recipe("baseline"), bf16, tmp_path / "b", progress=False)


@pytest.mark.parametrize(
    "optimizer,schedule",
    [
        ("adamw", "constant"),
        ("adafactor", "linear"),
        ("adafactor", "cosine"),
        ("adamw", "linear"),
        ("prodigy", "cosine"),
    ],
)
def test_each_optimizer_and_schedule_trains_a_tiny_sd(workspace, optimizer, schedule):
    from fullrange.checkpoint import Checkpoint

    out = f"opt_{optimizer}_{schedule}"
    lr = {"lr": 1.0} if optimizer == "prodigy" else {}  # Prodigy's lr scales the step size it estimates
    config = _config(workspace, out, train={"optimizer": optimizer, "lr_schedule": schedule} | lr)
    outputs = finetune(config, progress=False, log=lambda _: None)
    ups = {k: v for k, v in load_file(outputs["lora"] / "pytorch_lora_weights.safetensors").items() if "lora_B" in k}
    assert ups and all(v.abs().sum() > 0 for v in ups.values())  # B starts at 0: every one of them moved
    ckpt = Checkpoint(workspace / out / "train" / "checkpoint.safetensors")
    assert ckpt.meta["train"]["optimizer"] == optimizer and ckpt.meta["train"]["lr_schedule"] == schedule
    state = ckpt.optimizer_state()["state"]
    # Adafactor keeps factored second moments (a row and a column per matrix); AdamW full ones; Prodigy adds its
    # step-size estimate's state (s, p0).
    kinds = {key for per_param in state.values() for key in per_param}
    assert ("exp_avg_sq_row" in kinds) == (optimizer == "adafactor") and ("exp_avg" in kinds) == (
        optimizer != "adafactor"
    )
    assert ("s" in kinds) == (optimizer == "prodigy")


def test_8bit_adamw_runs_where_bitsandbytes_does_and_is_refused_with_a_reason_elsewhere(workspace):
    import importlib.util

    from fullrange.config import ConfigError

    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ConfigError, match=r"adamw8bit needs the bitsandbytes package \(pip install bitsandbytes\)"):
            _config(workspace, "bnb", train={"optimizer": "adamw8bit"})
        result = runner.invoke(app, ["train", "--optimizer", "adamw8bit", "--model", "m", "--data", "d", "--out", "o"])
        assert result.exit_code == 2 and result.output.startswith("error: --optimizer adamw8bit needs the bitsandbytes")
        return
    try:
        outputs = finetune(_config(workspace, "bnb", train={"optimizer": "adamw8bit"}), progress=False, log=print)
    except ConfigError as err:
        assert "adamw8bit does not run on cpu here" in str(err)
    else:
        assert (outputs["lora"] / "pytorch_lora_weights.safetensors").is_file()


def test_tensorboard_logs_and_an_adapter_per_checkpoint(workspace):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fullrange.train import lr_at

    config = _config(
        workspace,
        "tb",
        train={"report_to": "tensorboard", "lr_schedule": "linear", "warmup": 1},
        validation={"prompts": ["solid black"]},
        output={"family": "sd1"},
    )
    outputs = finetune(config, progress=False, log=lambda _: None)
    events = list((workspace / "tb" / "train" / "logs").glob("events.out.tfevents.*"))  # hparams: in a sub-run
    assert len(events) == 1
    logs = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    logs.Reload()
    losses = json.loads((workspace / "tb" / "train" / "loss.json").read_text())
    assert [e.step for e in logs.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in logs.Scalars("loss")] == pytest.approx(losses, rel=1e-6)
    assert [e.value for e in logs.Scalars("lr")] == pytest.approx([lr_at(s, config.train) for s in range(3)])
    assert [e.value for e in logs.Scalars("lr")] == pytest.approx([1e-3, 1e-3, 5e-4])  # warm-up 1, then linear
    assert [e.step for e in logs.Images("validation")] == [2, 3]
    # An adapter per checkpoint (steps 2 and 3), each as diffusers' folder and a kohya file; the last is the output.
    snapshots = workspace / "tb" / "checkpoints"
    assert sorted(p.name for p in snapshots.iterdir()) == ["step_000002", "step_000003"]
    final = load_file(outputs["lora"] / "pytorch_lora_weights.safetensors")
    at = {s: load_file(snapshots / f"step_00000{s}" / "lora" / "pytorch_lora_weights.safetensors") for s in (2, 3)}
    assert all(torch.equal(at[3][k], v) for k, v in final.items()) and set(at[2]) == set(final)
    assert any(not torch.equal(at[2][k], v) for k, v in final.items())
    with safe_open(snapshots / "step_000002" / "lora_kohya.safetensors", "pt") as f:
        names = f.keys()
    assert len([k for k in names if not k.endswith(".alpha")]) == len(final)


def test_text_encoder_lora_trains_and_reloads_in_diffusers(workspace):
    from fullrange.sd.model import TextConditionedUNet

    tables = {"adapter": {"kind": "lora", "text_encoder": True}, "output": {"family": "sd1"}}
    outputs = finetune(_config(workspace, "te", **tables), progress=False, log=lambda _: None)
    saved = load_file(outputs["lora"] / "pytorch_lora_weights.safetensors")
    te_ups = {k: v for k, v in saved.items() if k.startswith("text_encoder.") and "lora_B" in k}
    assert te_ups and all(v.abs().sum() > 0 for v in te_ups.values())  # trained: B starts at 0
    assert any(".q_proj." in k for k in te_ups) and any(k.startswith("unet.") for k in saved)

    pipe = StableDiffusionPipeline.from_pretrained(workspace / "sd", local_files_only=True)
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        before = pipe.text_encoder(ids.input_ids)[0]
        pipe.load_lora_weights(outputs["lora"])
        theirs = pipe.text_encoder(ids.input_ids)[0]
    assert (theirs - before).abs().max() > 1e-5
    loaded = get_peft_model_state_dict(pipe.text_encoder, adapter_name="default_0")
    assert len(loaded) == len([k for k in saved if k.startswith("text_encoder.")])  # every weight arrived
    # fullrange's own loader, from the folder and from the kohya file, gives diffusers' text states
    with safe_open(outputs["kohya"], "pt") as f:
        names = f.keys()
    assert any(k.startswith("lora_te_") for k in names)
    for adapter in (outputs["lora"], outputs["kohya"]):
        model = load_adapter(load_stable_diffusion(workspace / "sd"), adapter)
        torch.testing.assert_close(model.encode_prompts(PROMPTS)["encoder_hidden_states"], theirs, atol=1e-5, rtol=0)
    # the training module conditions through the encoders: the same states as sampling uses
    model = load_adapter(load_stable_diffusion(workspace / "sd"), outputs["lora"])
    wrapped = TextConditionedUNet(model)
    assert {n.split(".")[0] for n, _ in wrapped.named_parameters()} == {"unet", "text_encoder"}


def test_text_encoder_lora_needs_a_lora(workspace):
    from fullrange.config import ConfigError

    with pytest.raises(ConfigError, match="is a LoRA on the text encoders: it needs kind lora, not oft"):
        _config(workspace, "x", adapter={"kind": "oft", "text_encoder": True})


def test_the_model_card_says_how_to_sample_and_its_diffusers_code_runs(workspace, tmp_path):
    tables = {"adapter": {"kind": "lora"}, "noise": {"zero_terminal_snr": True}, "output": {"family": "sd1"}}
    outputs = finetune(_config(workspace, "card", **tables), progress=False, log=lambda _: None)
    card = outputs["card"].read_text()
    assert outputs["card"] == workspace / "card" / "README.md"
    for phrase in (
        "**v-prediction**",
        "**zero terminal SNR**",
        "ModelSamplingDiscrete",
        "`v_prediction`",
        "zsnr `true`",
    ):
        assert phrase in card, phrase
    assert "Zero Terminal SNR" in card and "lora_kohya.safetensors" in card and "guidance_rescale=0.7" in card
    code = card.split("```python\n")[1].split("```")[0]
    code = code.replace('pipe("...",', 'pipe("solid black", num_inference_steps=2, output_type="np",')
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # the card's own diffusers code
    assert scope["pipe"].scheduler.config.prediction_type == "v_prediction"
    assert scope["pipe"].scheduler.config.rescale_betas_zero_snr and scope["image"].shape[-1] == 3


def test_sample_png_says_what_made_it_and_takes_a_lora_file(workspace, tmp_path):
    import hashlib
    import struct

    tables = {"adapter": {"kind": "lora"}, "noise": {"zero_terminal_snr": True}, "output": {"family": "sd1"}}
    outputs = finetune(_config(workspace, "png", **tables), progress=False, log=lambda _: None)
    base = ["sample", "--model", str(workspace / "sd"), "--prompt", "solid black", "--prompt", "a white, bright field"]
    base += ["--steps", "3", "--resolution", "16", "--num-images", "2"]
    runs = {
        "folder": ["--adapter", str(outputs["lora"])],
        "file": ["--adapter", str(outputs["kohya"])],
        "batched": ["--adapter", str(outputs["kohya"]), "--batch-size", "3"],
        "bf16": ["--adapter", str(outputs["kohya"]), "--dtype", "bf16"],
    }
    umask = os.umask(0o022)
    try:
        for name, extra in runs.items():
            result = runner.invoke(app, [*base, *extra, "--out", str(tmp_path / name)])
            assert result.exit_code == 0, result.output
    finally:
        os.umask(umask)
    names = ["000000-solid-black", "000001-solid-black", "000002-a-white-bright-field", "000003-a-white-bright-field"]
    pixels = {
        run: np.stack([np.asarray(Image.open(tmp_path / run / f"{n}.png"), dtype=np.float64) for n in names])
        for run in runs
    }
    assert np.abs(pixels["file"] - pixels["folder"]).max() <= 1  # the kohya file is the folder's LoRA
    # batches of 3 keep every image's seed: equal but for rounding (batched kernels sum in another order)
    assert np.abs(pixels["batched"] - pixels["file"]).max() <= 1
    assert np.abs(pixels["file"][0] - pixels["file"][1]).mean() > 10  # another seed is another image
    assert 0 < np.abs(pixels["bf16"] - pixels["file"]).mean() < 8  # bf16 weights: close, not equal
    assert oct((tmp_path / "file" / f"{names[0]}.png").stat().st_mode & 0o777) == "0o644"

    image = Image.open(tmp_path / "file" / f"{names[3]}.png")
    info = json.loads(image.text["fullrange"])
    unet = (workspace / "sd" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    kohya = outputs["kohya"].read_bytes()
    (header,) = struct.unpack("<Q", kohya[:8])
    expected = {
        "prompt": "a white, bright field",
        "seed": 3,
        "sampler": "ddim",  # not asked for: what was picked, not null
        "spacing": "trailing",
        "resolution": 16,
        "model_hash": hashlib.sha256(unet).hexdigest()[:10],
        "adapter": str(outputs["kohya"]),
        "adapter_hash": hashlib.sha256(kohya[8 + header :]).hexdigest()[:12],
        "adapter_strength": 1.0,
        "prediction_type": "v_prediction",  # from the kohya file's own metadata
        "zero_terminal_snr": True,
        "dtype": "fp32",
    }
    assert {k: info[k] for k in expected} == expected
    prompt, parameters = image.text["parameters"].split("\n")
    assert prompt == "a white, bright field"
    assert parameters.startswith(
        "Steps: 3, Sampler: DDIM, Spacing: trailing, CFG scale: 7.5, Guidance rescale: 0.7, Seed: 3, Size: 16x16, "
        f"Model hash: {expected['model_hash']}, Model: sd, Lora hashes: "
        f'"lora_kohya: {expected["adapter_hash"]}", Lora strength: 1.0, Prediction: v_prediction, '
        "Zero terminal SNR: True, Version: fullrange "
    )
    assert json.loads(Image.open(tmp_path / "bf16" / f"{names[0]}.png").text["fullrange"])["dtype"] == "bf16"
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--dtype", "fp8"])
    assert bad.exit_code == 2 and "--dtype 'fp8' is not one of fp32, fp16, bf16" in bad.output


def test_train_from_a_kohya_folder_with_repeats_and_caption_files(workspace, tmp_path):
    """kohya's layout trains as it is: ``N_name`` subfolders (their repeats weigh the draws), ``.caption`` files, and
    the folder's name as the caption where an image has none."""
    import shutil

    data = tmp_path / "kohya"
    shutil.copytree(workspace / "data", data / "4_solid colours")
    for caption in (data / "4_solid colours").glob("*.txt"):
        caption.rename(caption.with_suffix(".caption"))
    (data / "4_solid colours" / "3.caption").unlink()  # captioned by the folder's name
    args = ["train", "--model", str(workspace / "sd"), "--data", str(data), "--out", str(tmp_path / "out")]
    args += ["--resolution", "16", "--max-steps", "2", "--caption-extension", ".caption", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "4 images" in result.output and "skipped" not in result.output


def test_model_cards_quote_paths_and_fit_every_adapter_kind(workspace, tmp_path):
    """A path with shell syntax is one quoted word in the card's shell line and a string in its Python; a full
    fine-tune's card names its pipeline (no adapter folder), says "an epsilon model", and has front-matter and an
    A1111 section that says what to load."""
    import shlex
    import shutil

    weird = shutil.copytree(workspace / "sd", tmp_path / "$(touch pwned) sd")
    tables = {"model": {"path": str(weird)}, "train": {"steps": 1, "batch_size": 2}, "output": {"family": "sd1"}}
    card = finetune(_config(workspace, tmp_path / "lora", **tables), progress=False, log=lambda _: None)["card"]
    text = card.read_text()
    line = next(line for line in text.splitlines() if line.startswith("fullrange sample"))
    words = shlex.split(line)
    assert words[words.index("--model") + 1] == str(weird)
    compile(text.split("```python\n")[1].split("```")[0], "card", "exec")
    assert (
        text.startswith("---\nbase_model: ") and "library_name: diffusers" in text and not (tmp_path / "pwned").exists()
    )
    tables = {"adapter": {"kind": "full"}, "train": {"steps": 1, "batch_size": 2}}
    full = finetune(_config(workspace, tmp_path / "full", **tables), progress=False, log=lambda _: None)["card"]
    text = full.read_text()
    assert "an **epsilon** model" in text and "from the adapter folder" not in text and "from the pipeline" in text
    assert "**A1111**: load a single file" in text and "- full" in text


def test_a_run_whose_caches_are_complete_never_moves_the_encoders_and_writes_the_same_lora(workspace, monkeypatch):
    """The VAE and text encoders go to the device only to encode what is not cached. With every latent and caption
    state cached, the device they would go to is one no tensor can be computed on (meta), and the run still writes
    the first run's LoRA, bit for bit; with an empty cache the same device fails the run."""
    import shutil

    first = finetune(_config(workspace, "cached_a", adapter={"kind": "lora"}), progress=False, log=lambda _: None)
    shutil.copytree(workspace / "cached_a", workspace / "cached_b")  # its cache, without its checkpoint
    shutil.rmtree(workspace / "cached_b" / "train")
    monkeypatch.setattr("fullrange.sd.latents.inference_device", lambda: torch.device("meta"))
    second = finetune(_config(workspace, "cached_b", adapter={"kind": "lora"}), progress=False, log=lambda _: None)
    a, b = (load_file(o["lora"] / "pytorch_lora_weights.safetensors") for o in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(NotImplementedError, match="meta tensor"):  # the patch bites where something is encoded
        finetune(_config(workspace, "cached_c", adapter={"kind": "lora"}), progress=False, log=lambda _: None)


def test_memory_presets_fill_what_is_not_given(workspace):
    full = _config(workspace, "p", train={"memory": "8gb"}, adapter={"kind": "full"}).train
    assert (full.mixed_precision, full.gradient_checkpointing, full.optimizer) == ("bf16", True, "adafactor")
    assert full.full_bf16 and full.fused_backward and full.grad_clip == 0
    lora = _config(workspace, "p", train={"memory": "8gb"}).train
    assert (lora.mixed_precision, lora.gradient_checkpointing, lora.fused_backward) == ("bf16", True, False)
    roomy = _config(workspace, "p", train={"memory": "24gb"}).train
    assert (roomy.mixed_precision, roomy.gradient_checkpointing) == ("bf16", False)
    given = _config(workspace, "p", train={"memory": "8gb", "optimizer": "adamw"}, adapter={"kind": "full"}).train
    assert given.optimizer == "adamw" and given.fused_backward and given.memory == "8gb"
    result = runner.invoke(app, ["train", "--memory", "4gb", "--model", "m", "--data", "d", "--out", "o"])
    assert result.exit_code == 2 and result.output.startswith("error: --memory '4gb' is not one of 24gb, 16gb")


def test_a_bf16_run_saves_its_frozen_parts_in_full_precision(workspace, tmp_path):
    """Under bf16 the frozen UNet trains in bf16 and validation samples with bf16 copies of the encoders, but what
    the run saves starts from the weights as stored: an OFT run's merged pipeline holds the base's VAE and text
    encoder bit for bit, and its UNet is the adapter merged into the fp32 base (its own process: accelerate keeps
    one precision per process)."""
    import subprocess
    import sys

    from fullrange.adapters import ADAPTERS

    out = tmp_path / "oft_bf16"
    args = [sys.executable, "-m", "fullrange", "train", "--model", str(workspace / "sd"), "--out", str(out)]
    args += ["--data", str(workspace / "data"), "--resolution", "16", "--max-steps", "2", "--checkpoint-every", "1"]
    args += ["--adapter", "oft", "--mixed-precision", "bf16", "--validation-prompt", "dark", "--no-progress"]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "validation" / "step_000002").is_dir()
    base = load_stable_diffusion(workspace / "sd")
    expected = load_adapter(load_stable_diffusion(workspace / "sd"), out / "oft")
    ADAPTERS["oft"].merge(expected)
    saved = load_stable_diffusion(out / "pipeline")
    for part in ("vae", "text_encoder"):
        mine, theirs = getattr(saved, part).state_dict(), getattr(base, part).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), part
    merged, unet = expected.unet.state_dict(), saved.unet.state_dict()
    assert {v.dtype for v in unet.values()} == {torch.float32}
    assert all(torch.equal(unet[k], merged[k]) for k in merged)


def test_full_fine_tune_to_rectified_flow_saves_a_flow_pipeline(workspace, diffusers_images):
    """``noise.flow_shift`` turns the checkpoint into rectified flow: the saved pipeline's scheduler is
    flow-matching with that shift, fullrange loads it back as flow, diffusers' SD pipeline with FullrangeScheduler
    samples it as fullrange does, and the card says how to sample it in each tool."""
    from fullrange.diffusers import FullrangeScheduler

    config = _config(workspace, "flow", adapter={"kind": "full"}, noise={"flow_shift": 3.0})
    outputs = finetune(config, progress=False, log=lambda _: None)
    scheduler = json.loads((outputs["pipeline"] / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0
    saved = json.loads((workspace / "flow" / "config.json").read_text())
    assert saved["recipe"]["timestep_draw"] == "logit_normal" and saved["recipe"]["spec"]["prediction"] == "flow"
    model = load_stable_diffusion(outputs["pipeline"])
    assert model.spec.prediction == "flow" and model.spec.schedule.shift == 3.0
    pipe = StableDiffusionPipeline.from_pretrained(outputs["pipeline"], local_files_only=True)
    pipe.scheduler = FullrangeScheduler.from_config(pipe.scheduler.config)
    theirs = diffusers_images(pipe, PROMPTS, steps=4, guidance=3.0)
    ours = generate(model, PROMPTS, SampleSettings(steps=4, guidance=3.0))
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)
    card = outputs["card"].read_text()
    assert "**rectified-flow** model with time shift **3**" in card and "*ModelSamplingSD3* with shift 3" in card
    assert "ModelSamplingDiscrete" not in card and "guidance_rescale" not in card
    with pytest.raises(Exception, match="flow_shift"):
        _config(workspace, "bad", noise={"flow_shift": 3.0, "zero_terminal_snr": True})
    # A LoRA turned flow: its folder carries the flow config; no kohya file (no tool reads one), said, not a crash.
    said = []
    tables = {"adapter": {"kind": "lora"}, "noise": {"flow_shift": 3.0}, "output": {"family": "sd1"}}
    lora = finetune(_config(workspace, "flow_lora", **tables), progress=False, log=said.append)
    assert "kohya" not in lora and any("kohya file not written: adapter exports of flow" in line for line in said)
    assert load_adapter(load_stable_diffusion(workspace / "sd"), lora["lora"]).spec.schedule.shift == 3.0
