from types import SimpleNamespace

import pytest
import torch

MEASURED: list[str] = []


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def report():
    """Record a measured figure; all of them are printed at the end of the run (never hard-coded)."""
    return MEASURED.append


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured in this run")
        for line in MEASURED:
            terminalreporter.write_line(line)


@pytest.fixture
def diffusers_images():
    """Images in [0, 1] from a diffusers pipeline at 16×16 pixels, with the latents fullrange's sampling draws
    for seeds 0, 1, ... (one per prompt)."""

    def run(pipe, prompts, steps, guidance, negative_prompt=None):
        noise = [torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(len(prompts))]
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            prompts,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=torch.stack(noise),
            height=16,
            width=16,
            output_type="pt",
        ).images

    return run


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny SD 1.x-shaped diffusers folder built from configs (read-only: copy it to change it)."""
    from fullrange.sd.testing import save_tiny_stable_diffusion

    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL-shaped diffusers folder built from configs (read-only)."""
    from fullrange.sd.testing import save_tiny_stable_diffusion

    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("sdxl") / "tiny", xl=True)


@pytest.fixture(scope="session")
def bundled(tmp_path_factory):
    """The bundled SD 1.x / 2.x / XL config folders, by family."""
    from fullrange.sd import single_file
    from fullrange.sd.export import FAMILIES

    root = tmp_path_factory.mktemp("configs")
    return {name: single_file.write_config_folder(name, root / name) for name in FAMILIES}


@pytest.fixture(scope="session")
def meta_models():
    """``meta_models(folder)``: a config folder's networks on the meta device (shapes and names, no memory), named
    as ``StableDiffusion`` names them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def build(folder):
        parts = {}
        with torch.device("meta"):
            parts["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            parts["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            parts["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
            if (folder / "text_encoder_2").is_dir():
                config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
                parts["text_encoder_2"] = CLIPTextModelWithProjection(config)
        return SimpleNamespace(**parts, is_xl="text_encoder_2" in parts)

    return build
