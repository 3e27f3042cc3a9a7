"""The Stable Diffusion model object: its networks and tokenizers, how it is sampled (its spec), and the UNet's
conditioning built from prompts and image sizes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..sampling import SamplingSpec


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

    def to(self, device: torch.device | str) -> StableDiffusion:
        """Move the networks (in place); returns self."""
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is not None:
                module.to(device)
        return self

    @property
    def is_xl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The text encoders' states for ``prompts`` (padded to the tokenizers' max length): CLIP's last hidden
        states as ``encoder_hidden_states`` (SD 1.x / 2.x); for SDXL both encoders' penultimate states side by side
        and the second's pooled projection as ``text_embeds``, as diffusers' SDXL pipeline builds them."""

        def ids(tokenizer, encoder):
            kwargs = {"padding": "max_length", "max_length": tokenizer.model_max_length, "truncation": True}
            return tokenizer(prompts, return_tensors="pt", **kwargs).input_ids.to(encoder.device)

        if not self.is_xl:
            return {"encoder_hidden_states": self.text_encoder(ids(self.tokenizer, self.text_encoder))[0]}
        first = self.text_encoder(ids(self.tokenizer, self.text_encoder), output_hidden_states=True)
        second = self.text_encoder_2(ids(self.tokenizer_2, self.text_encoder_2), output_hidden_states=True)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2])], dim=-1)
        return {"encoder_hidden_states": states, "text_embeds": second.text_embeds}

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
