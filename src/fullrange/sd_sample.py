"""Sample Stable Diffusion with fullrange's samplers and guidance; PNGs carry their settings."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .images import tile
from .samplers import sample
from .sd import StableDiffusion, schedule_from_config


@dataclass(frozen=True)
class SampleSettings:
    sampler: str = "ddim"
    steps: int = 25
    spacing: str | None = None
    guidance: float = 7.5
    guidance_rescale: float = 0.0
    seed: int = 0
    resolution: int | None = None
    negative_prompt: str = ""

    def validate(self) -> SampleSettings:
        if self.steps <= 0:
            raise ValueError(f"--steps must be positive, got {self.steps}")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        return self


def apply_adapter(model: StableDiffusion, adapter_dir: Path | str, strength: float = 1.0) -> None:
    """Load a LoRA folder (diffusers' ``save_lora_weights`` format) or an OFT folder written by ``fullrange train``
    into the UNet, at ``strength``; a scheduler config saved beside it replaces the checkpoint's (prediction
    type, zero terminal SNR)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from . import adapters

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "pytorch_lora_weights.safetensors").is_file():
        state = StableDiffusionPipeline.lora_state_dict(adapter_dir)[0]
        model.unet.load_lora_adapter(state, prefix="unet", adapter_name="fullrange")
        model.unet.set_adapters(["fullrange"], weights=[strength])
    elif (adapter_dir / "adapter.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file():
        spec = json.loads((adapter_dir / "adapter.json").read_text())
        weights = load_file(adapter_dir / "adapter_model.safetensors")
        adapters.load_oft(model.unet, weights, spec["block_size"], spec["coft"], strength)
    else:
        raise ValueError(
            f"--adapter {adapter_dir}: neither a LoRA (pytorch_lora_weights.safetensors) nor an OFT "
            "folder (adapter.json, adapter_model.safetensors)"
        )
    config_path = adapter_dir / "scheduler_config.json"
    if config_path.is_file():
        model.scheduler_config = json.loads(config_path.read_text())
        model.schedule, model.prediction = schedule_from_config(model.scheduler_config)


@torch.no_grad()
def generate(model: StableDiffusion, prompts: list[str], settings: SampleSettings, callback=None) -> torch.Tensor:
    """Images in [0, 1], shape (N, 3, H, W), one per prompt, seeds ``seed + i``."""
    settings.validate()
    config = model.scheduler_config
    spacing = settings.spacing or config.get("timestep_spacing", "leading")
    size = (settings.resolution or model.unet.config.sample_size * model.vae_scale_factor) // model.vae_scale_factor
    noise = torch.stack(
        [
            torch.randn(
                model.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(settings.seed + i)
            )
            for i in range(len(prompts))
        ]
    )
    device = model.unet.device
    pixels = (size * model.vae_scale_factor,) * 2
    sizes = {k: v.expand(len(prompts), -1) for k, v in model.size_cond(pixels, (0, 0), pixels).items()}
    cond = {k: v.to(device) for k, v in (model.encode_prompts(prompts) | sizes).items()}
    if model.is_xl and not settings.negative_prompt:  # SDXL's empty negative prompt is zeros (diffusers' default)
        uncond = {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in cond.items()}
    else:
        negative = model.encode_prompts([settings.negative_prompt] * len(prompts)) | sizes
        uncond = {k: v.to(device) for k, v in negative.items()}
    latents = sample(
        model.unet,
        noise.to(device),
        schedule=model.schedule,
        prediction=model.prediction,
        sampler=settings.sampler,
        steps=settings.steps,
        spacing=spacing,
        steps_offset=config.get("steps_offset", 0),
        cond=cond,
        uncond=uncond,
        guidance_scale=settings.guidance,
        guidance_rescale=settings.guidance_rescale,
        callback=callback,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    latents = latents.to(model.vae.device, model.vae.dtype) / model.vae.config.scaling_factor
    images = model.vae.decode(latents).sample
    return ((images.float().cpu() + 1) / 2).clamp(0, 1)


def save_images(images: torch.Tensor, prompts: list[str], settings: SampleSettings, out: Path) -> list[Path]:
    """One PNG per image with its prompt and settings in a ``fullrange`` text chunk, and ``grid.png``."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, (array, prompt) in enumerate(zip(arrays, prompts, strict=True)):
        info = PngInfo()
        info.add_text("fullrange", json.dumps({"prompt": prompt, **asdict(settings), "seed": settings.seed + i}))
        path = out / f"{i:04d}.png"
        Image.fromarray(array).save(path, pnginfo=info)
        paths.append(path)
    Image.fromarray(tile(torch.from_numpy(arrays).permute(0, 3, 1, 2), columns=4).numpy()).save(out / "grid.png")
    return paths
