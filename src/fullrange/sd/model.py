"""The Stable Diffusion model object: its networks and tokenizers, how it is sampled (its spec), and the UNet's
conditioning built from prompts and image sizes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError
from ..sampling import SamplingSpec
from ..scheduler_config import ddim_scheduler

FAMILIES = ("sd1", "sd2", "sdxl")
"""The layouts of the files other tools load: SD 1.x, SD 2.x, SDXL."""


@dataclass(frozen=True)
class StableDiffusion:
    """The parts of an SD 1.x / 2.x / XL checkpoint fullrange uses and its :class:`SamplingSpec`. SDXL adds a
    second text encoder and tokenizer (``text_encoder_2``, ``tokenizer_2``). ``source`` is where it was loaded
    from. Frozen: a changed model (another spec, an adapter) is a new object sharing the networks."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    spec: SamplingSpec
    source: Path
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StableDiffusion:
        """Move or cast the networks (in place); returns self."""
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is not None:
                module.to(device=device, dtype=dtype)
        return self

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders by diffusers' name for them (``text_encoder``, SDXL's ``text_encoder_2``)."""
        found = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {name: encoder for name, encoder in found.items() if encoder is not None}

    @property
    def is_xl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def family(self) -> str:
        """``sdxl`` for SDXL, else ``sd1`` or ``sd2`` from the UNet's cross-attention width (768: CLIP ViT-L, 1024:
        OpenCLIP ViT-H); a ConfigError naming ``family`` where the width is neither."""
        if self.is_xl:
            return "sdxl"
        names = {768: "sd1", 1024: "sd2"}
        width = self.unet.config.cross_attention_dim
        if width not in names:
            raise ConfigError(
                "family",
                f"is needed: cross_attention_dim {width} is neither SD 1.x's 768 nor SD 2.x's 1024; give sd1 or sd2",
            )
        return names[width]

    def layout(self, family: str | None) -> str:
        """The layout of files written for other tools: ``family`` if given (checked), else :attr:`family`."""
        family = family or self.family
        if family not in FAMILIES:
            raise ConfigError("family", f"{family!r} is not one of {', '.join(FAMILIES)}")
        if (family == "sdxl") != self.is_xl:
            raise ConfigError("family", f"{family}: the model is {'' if self.is_xl else 'not '}SDXL")
        return family

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior of images in [-1, 1], (N, 3, H, W): its mean and std in the UNet's units (times the VAE's
        ``scaling_factor``), float32 on the CPU."""
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        scale = self.vae.config.scaling_factor
        return dist.mean.float().cpu() * scale, dist.std.float().cpu() * scale

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], float32 on the CPU, from latents in the UNet's units. Checked first: latents that are not
        finite, or an image that decodes to a single value, raise a ``ValueError`` (a sampler driven out of range
        would otherwise leave a black or flat image that looks like a result)."""
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("the sampled latents are not finite (NaN or inf)")
        latents = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor
        images = self.vae.decode(latents).sample.float().cpu()
        flat = images.flatten(1)
        if not bool(torch.isfinite(flat).all()) or bool((flat.amax(1) == flat.amin(1)).any()):
            raise ValueError("the decoded images are not finite, or one is a single flat value")
        return ((images + 1) / 2).clamp(0, 1)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids of ``prompts`` for each text encoder, padded to the tokenizer's max length: ``input_ids``
        and, for SDXL, ``input_ids_2``; on the encoders' devices."""

        def ids(tokenizer, encoder):
            kwargs = {"padding": "max_length", "max_length": tokenizer.model_max_length, "truncation": True}
            return tokenizer(prompts, return_tensors="pt", **kwargs).input_ids.to(encoder.device)

        out = {"input_ids": ids(self.tokenizer, self.text_encoder)}
        if self.is_xl:
            out["input_ids_2"] = ids(self.tokenizer_2, self.text_encoder_2)
        return out

    def encode_ids(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The text encoders' states for token ids (:meth:`tokenize`), with gradients where the encoders have
        trainable parameters: CLIP's last hidden states as ``encoder_hidden_states`` (SD 1.x / 2.x); for SDXL both
        encoders' penultimate states side by side and the second's pooled projection as ``text_embeds``, as
        diffusers' SDXL pipeline builds them."""
        if not self.is_xl:
            return {"encoder_hidden_states": self.text_encoder(input_ids)[0]}
        first = self.text_encoder(input_ids, output_hidden_states=True)
        second = self.text_encoder_2(input_ids_2, output_hidden_states=True)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2])], dim=-1)
        return {"encoder_hidden_states": states, "text_embeds": second.text_embeds}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """:meth:`encode_ids` of :meth:`tokenize`, without gradients."""
        return self.encode_ids(**self.tokenize(prompts))

    def time_ids(
        self, original: tuple[int, int], crop_top_left: tuple[int, int], target: tuple[int, int]
    ) -> torch.Tensor | None:
        """SDXL's size and crop conditioning: original (h, w), crop top-left, target (h, w), in pixels; ``None``
        for SD 1.x / 2.x."""
        if not self.is_xl:
            return None
        return torch.tensor([*original, *crop_top_left, *target], dtype=torch.float32)

    def condition(self, text: dict[str, torch.Tensor], time_ids: torch.Tensor | None = None) -> dict:
        """The UNet's keyword arguments from :meth:`encode_prompts`' states and (SDXL) batched ``time_ids``:
        ``encoder_hidden_states``, and for SDXL ``added_cond_kwargs`` with ``text_embeds`` and ``time_ids``."""
        cond = {"encoder_hidden_states": text["encoder_hidden_states"]}
        if self.is_xl:
            if time_ids is None:
                raise ValueError("SDXL needs time_ids (original size, crop, target size) to condition its UNet")
            cond["added_cond_kwargs"] = {"text_embeds": text["text_embeds"], "time_ids": time_ids}
        return cond


class TextConditionedUNet(torch.nn.Module):
    """The UNet conditioned through the text encoders, called with token ids (``input_ids``, SDXL's
    ``input_ids_2`` and ``time_ids``) instead of their states, so that adapters on the encoders train with it. Holds
    the model's own networks (no copy): its parameters are named ``unet.…``, ``text_encoder.…``,
    ``text_encoder_2.…``."""

    def __init__(self, model: StableDiffusion):
        super().__init__()
        self.unet, self.text_encoder, self.text_encoder_2 = model.unet, model.text_encoder, model.text_encoder_2
        self.model = [model]  # in a list: not registered as a submodule a second time

    def forward(self, x, t, input_ids, input_ids_2=None, time_ids=None):
        model = self.model[0]
        text = model.encode_ids(input_ids, input_ids_2)
        return self.unet(x, t, **model.condition(text, time_ids))

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        for encoder in (self.text_encoder, self.text_encoder_2):
            if encoder is not None:
                encoder.gradient_checkpointing_enable()


def pipeline_class(model: StableDiffusion):
    """diffusers' pipeline class for ``model``: ``StableDiffusionXLPipeline`` or ``StableDiffusionPipeline``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if model.is_xl else StableDiffusionPipeline


def as_pipeline(model: StableDiffusion):
    """``model`` as a diffusers pipeline sharing its networks (nothing is copied), its scheduler configured by its
    spec: for diffusers' own savers and loaders."""
    parts = {"vae": model.vae, "text_encoder": model.text_encoder, "tokenizer": model.tokenizer, "unet": model.unet}
    parts["scheduler"] = ddim_scheduler(model.spec)
    if model.is_xl:
        parts |= {"text_encoder_2": model.text_encoder_2, "tokenizer_2": model.tokenizer_2}
    else:
        parts |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return pipeline_class(model)(**parts)
