"""SDXL: a tiny SDXL built from configs (two text encoders, size conditioning) fine-tuned and sampled by
fullrange, checked against diffusers' StableDiffusionXLPipeline."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from peft import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file

from fullrange.sd import load_adapter, load_stable_diffusion
from fullrange.sd.config import finetune_config, merge
from fullrange.sd.finetune import finetune
from fullrange.sd.sample import SampleSettings, generate
from fullrange.sd.testing import save_tiny_stable_diffusion

PROMPTS = ["solid black", "a bright scene"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("xl")
    save_tiny_stable_diffusion(root / "sdxl", xl=True)
    (root / "data").mkdir()
    for i, (value, caption) in enumerate([(0, "solid black"), (255, "solid white"), (40, "dark"), (215, "bright")]):
        Image.fromarray(np.full((20, 24 + 8 * i, 3), value, dtype=np.uint8)).save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text(caption)
    return root


def _config(workspace, out, **tables):
    base = {
        "model": {"path": str(workspace / "sdxl")},
        "data": {"path": str(workspace / "data"), "resolution": 16},
        "output": {"path": str(workspace / out)},
        "train": {"batch_size": 2, "lr": 1e-3},
    }
    return finetune_config(merge(base, tables))


@pytest.mark.parametrize("negative_prompt", ["", "blurry"])
def test_sampling_matches_diffusers_sdxl_pipeline(workspace, negative_prompt, diffusers_images):
    model = load_stable_diffusion(workspace / "sdxl")
    assert model.is_xl
    ours = generate(
        model,
        PROMPTS,
        SampleSettings(
            sampler="ddim",
            steps=4,
            spacing=model.spec.spacing,  # the pipeline's own
            guidance=4.0,
            resolution=16,
            negative_prompt=negative_prompt,
        ),
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(workspace / "sdxl", local_files_only=True)
    # fullrange's last DDIM step returns x0; diffusers' does with set_alpha_to_one (else it stops at ᾱ_0 < 1).
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    theirs = diffusers_images(pipe, PROMPTS, 4, 4.0, negative_prompt or None)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)


def test_lora_with_zero_terminal_snr_loads_in_diffusers_and_matches(workspace, diffusers_images):
    config = _config(
        workspace,
        "lora_run",
        adapter={"kind": "lora"},
        noise={"zero_terminal_snr": True},
        train={"steps": 3, "checkpoint_every": 2},
    )
    outputs = finetune(config, progress=False, log=lambda _: None)
    pipe = StableDiffusionXLPipeline.from_pretrained(workspace / "sdxl", local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_pretrained(outputs["lora"])
    pipe.load_lora_weights(outputs["lora"])
    # Every trained LoRA weight, attention and ResNet layers alike, arrives in diffusers' UNet.
    saved = load_file(outputs["lora"] / "pytorch_lora_weights.safetensors")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="default_0")
    assert {f"unet.{k}" for k in loaded} == set(saved) and any(".attn2.to_k." in k for k in saved)
    assert all(torch.equal(loaded[k.removeprefix("unet.")], v) for k, v in saved.items())
    theirs = diffusers_images(pipe, PROMPTS, 5, 3.0)

    model = load_adapter(load_stable_diffusion(workspace / "sdxl"), outputs["lora"])
    assert model.spec.prediction == "v_prediction" and model.spec.schedule.zero_terminal_snr
    settings = SampleSettings(
        sampler="ddim", steps=5, spacing="trailing", guidance=3.0, guidance_rescale=0.0, resolution=16
    )
    ours = generate(model, PROMPTS, settings)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)


def test_size_conditioning_records_original_size_and_crop(workspace, tmp_path):
    """Each training image carries SDXL's time_ids: its original (h, w), the centred crop's top-left in the
    resized image, and the target size."""
    from fullrange import data
    from fullrange.sd.config import DataConfig
    from fullrange.sd.latents import image_batches

    model = load_stable_diffusion(workspace / "sdxl")
    items, _ = data.scan(workspace / "data", min_size=16)
    config = DataConfig("d", resolution=16, caption_dropout=0.0)
    batch = image_batches(model, items, config, tmp_path, progress=False)(64, torch.Generator().manual_seed(0))
    added = batch.cond["added_cond_kwargs"]
    assert set(batch.cond) == {"encoder_hidden_states", "added_cond_kwargs"} and set(added) == {
        "text_embeds",
        "time_ids",
    }
    rows = {tuple(r) for r in added["time_ids"].int().tolist()}
    # 20 x 24, 32, 40, 48 images resized to cover 16 x 16: height 16, width 19, 26, 32, 38; crop left = excess // 2
    assert rows == {(20, 24, 0, 1, 16, 16), (20, 32, 0, 5, 16, 16), (20, 40, 0, 8, 16, 16), (20, 48, 0, 11, 16, 16)}


def test_full_fine_tune_saves_an_sdxl_pipeline_diffusers_samples_alike(workspace, diffusers_images):
    config = _config(
        workspace,
        "full_run",
        adapter={"kind": "full"},
        noise={"offset": 0.1},
        data={"buckets": True},
        train={"steps": 2},
    )
    outputs = finetune(config, progress=False, log=lambda _: None)
    pipe = StableDiffusionXLPipeline.from_pretrained(outputs["pipeline"], local_files_only=True)
    theirs = diffusers_images(pipe, PROMPTS, 4, 3.0)
    model = load_stable_diffusion(outputs["pipeline"])
    assert model.is_xl and model.spec.prediction == "epsilon"
    ours = generate(
        model,
        PROMPTS,
        SampleSettings(
            sampler="ddim", steps=4, spacing=pipe.scheduler.config.timestep_spacing, guidance=3.0, resolution=16
        ),
    )
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)
    base = load_stable_diffusion(workspace / "sdxl")
    changed = [k for k, v in base.unet.state_dict().items() if not torch.equal(v, model.unet.state_dict()[k])]
    assert changed  # the UNet was trained


def test_text_encoder_lora_on_both_encoders_trains_and_reloads_in_diffusers(workspace):
    """SDXL's two text encoders each get a LoRA, trained through the size-conditioned UNet, saved as diffusers
    names it, and loaded by diffusers' SDXL pipeline to the same text states fullrange computes."""
    config = _config(
        workspace,
        "te_run",
        adapter={"kind": "lora", "text_encoder": True},
        train={"steps": 3, "checkpoint_every": 2},
        output={"family": "sdxl"},
    )
    outputs = finetune(config, progress=False, log=lambda _: None)
    saved = load_file(outputs["lora"] / "pytorch_lora_weights.safetensors")
    for prefix in ("text_encoder.", "text_encoder_2."):
        ups = {k: v for k, v in saved.items() if k.startswith(prefix) and "lora_B" in k}
        last = max(int(k.split("layers.")[1].split(".")[0]) for k in ups)
        moved = {k for k, v in ups.items() if v.abs().sum() > 0}
        # SDXL conditions on the first encoder's penultimate layer: its last layer gets no gradient and stays at 0
        frozen = {k for k in ups if f"layers.{last}." in k} if prefix == "text_encoder." else set()
        assert moved == set(ups) - frozen and moved, prefix
    pipe = StableDiffusionXLPipeline.from_pretrained(workspace / "sdxl", local_files_only=True)
    pipe.load_lora_weights(outputs["lora"])
    theirs, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    model = load_adapter(load_stable_diffusion(workspace / "sdxl"), outputs["kohya"])
    ours = model.encode_prompts(PROMPTS)
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["text_embeds"], pooled, atol=1e-5, rtol=0)
