"""SDXL: a tiny SDXL built from configs (two text encoders, size conditioning) fine-tuned and sampled by
fullrange, checked against diffusers' StableDiffusionXLPipeline."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from peft import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file

from fullrange import sd
from fullrange.sd_finetune import FinetuneOptions, finetune
from fullrange.sd_sample import SampleSettings, apply_adapter, generate

PROMPTS = ["solid black", "a bright scene"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("xl")
    sd.save_tiny_stable_diffusion(root / "sdxl", xl=True)
    (root / "data").mkdir()
    for i, (value, caption) in enumerate([(0, "solid black"), (255, "solid white"), (40, "dark"), (215, "bright")]):
        Image.fromarray(np.full((20, 24 + 8 * i, 3), value, dtype=np.uint8)).save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text(caption)
    return root


def _options(workspace, out, **changes):
    base = {"model": str(workspace / "sdxl"), "data": str(workspace / "data"), "out": str(workspace / out)}
    return FinetuneOptions(**(base | {"resolution": 16, "batch_size": 2, "lr": 1e-3} | changes)).validate()


@pytest.mark.parametrize("negative_prompt", ["", "blurry"])
def test_sampling_matches_diffusers_sdxl_pipeline(workspace, negative_prompt, diffusers_images):
    model = sd.load_stable_diffusion(workspace / "sdxl")
    assert model.is_xl
    ours = generate(
        model,
        PROMPTS,
        SampleSettings(sampler="ddim", steps=4, guidance=4.0, resolution=16, negative_prompt=negative_prompt),
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(workspace / "sdxl", local_files_only=True)
    # fullrange's last DDIM step returns x0; diffusers' does with set_alpha_to_one (else it stops at ᾱ_0 < 1).
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    theirs = diffusers_images(pipe, PROMPTS, 4, 4.0, negative_prompt or None)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)


def test_lora_with_zero_terminal_snr_loads_in_diffusers_and_matches(workspace, diffusers_images):
    options = _options(workspace, "lora_run", adapter="lora", zero_terminal_snr=True, max_steps=3, checkpoint_every=2)
    outputs = finetune(options, progress=False, log=lambda _: None)
    pipe = StableDiffusionXLPipeline.from_pretrained(workspace / "sdxl", local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_pretrained(outputs["lora"])
    pipe.load_lora_weights(outputs["lora"])
    # Every trained LoRA weight, attention and ResNet layers alike, arrives in diffusers' UNet.
    saved = load_file(outputs["lora"] / "pytorch_lora_weights.safetensors")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="default_0")
    assert {f"unet.{k}" for k in loaded} == set(saved) and any(".attn2.to_k." in k for k in saved)
    assert all(torch.equal(loaded[k.removeprefix("unet.")], v) for k, v in saved.items())
    theirs = diffusers_images(pipe, PROMPTS, 5, 3.0)

    model = sd.load_stable_diffusion(workspace / "sdxl")
    apply_adapter(model, outputs["lora"])
    assert model.prediction == "v_prediction" and model.schedule.zero_terminal_snr
    ours = generate(model, PROMPTS, SampleSettings(sampler="ddim", steps=5, guidance=3.0, resolution=16))
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)


def test_size_conditioning_records_original_size_and_crop(workspace, tmp_path):
    """Each training image carries SDXL's time_ids: its original (h, w), the centred crop's top-left in the
    resized image, and the target size."""
    from fullrange import data
    from fullrange.sd_finetune import image_batches

    model = sd.load_stable_diffusion(workspace / "sdxl")
    items, _ = data.scan(workspace / "data", min_size=16)
    options = FinetuneOptions(model="m", data="d", out="o", resolution=16, caption_dropout=0.0)
    batch = image_batches(model, items, options, tmp_path, progress=False)(64, torch.Generator().manual_seed(0))
    rows = {tuple(r) for r in batch.cond["time_ids"].int().tolist()}
    # 20 x 24, 32, 40, 48 images resized to cover 16 x 16: height 16, width 19, 26, 32, 38; crop left = excess // 2
    assert rows == {(20, 24, 0, 1, 16, 16), (20, 32, 0, 5, 16, 16), (20, 40, 0, 8, 16, 16), (20, 48, 0, 11, 16, 16)}


def test_full_fine_tune_saves_an_sdxl_pipeline_diffusers_samples_alike(workspace, diffusers_images):
    options = _options(workspace, "full_run", adapter="full", offset_noise=0.1, buckets=True, max_steps=2)
    outputs = finetune(options, progress=False, log=lambda _: None)
    pipe = StableDiffusionXLPipeline.from_pretrained(outputs["pipeline"], local_files_only=True)
    theirs = diffusers_images(pipe, PROMPTS, 4, 3.0)
    model = sd.load_stable_diffusion(outputs["pipeline"])
    assert model.is_xl and model.prediction == "epsilon"
    ours = generate(model, PROMPTS, SampleSettings(sampler="ddim", steps=4, guidance=3.0, resolution=16))
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)
    base = sd.load_stable_diffusion(workspace / "sdxl")
    changed = [k for k, v in base.unet.state_dict().items() if not torch.equal(v, model.unet.state_dict()[k])]
    assert changed  # the UNet was trained
