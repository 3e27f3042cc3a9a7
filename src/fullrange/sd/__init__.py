"""Stable Diffusion 1.x / 2.x / XL: the model object, loading, single files, LDM names, export, fine-tuning,
sampling and evaluation.

| module | what |
|---|---|
| ``model`` | :class:`StableDiffusion`: networks, tokenizers, sampling spec, the UNet's conditioning |
| ``load`` | from a diffusers folder, a single file or the hub; adapters onto a loaded model; ControlNets; the device |
| ``single_file`` | reading LDM-layout files offline: checksum, family, markers, bundled configs |
| ``tokenizer`` | CLIP's BPE tokenizer files rebuilt from the bundled merges |
| ``ldm`` | diffusers → LDM names for UNet, VAE and text encoders |
| ``export`` | one single file with v_pred / ztsnr markers, or a diffusers folder (adapters: their records) |
| ``config`` | ``fullrange train``'s tables: ``[model]``, ``[data]``, ``[noise]``, ``[adapter]``, ``[train]``, ... |
| ``latents`` | image folder → cached latents and caption states → batches |
| ``finetune`` | load → batches → adapter → train → save |
| ``sample``, ``eval`` | images with fullrange's samplers (a start, a network, a hook); the brightness range reached |
| ``pnginfo``, ``tone`` | what a PNG says about how it was made; the leak of a tone, an image or a folder's statistics |
| ``testing`` | tiny models built from configs, for tests and benchmarks |
"""

from .load import load_adapter, load_stable_diffusion
from .model import StableDiffusion

__all__ = ["StableDiffusion", "load_adapter", "load_stable_diffusion"]
