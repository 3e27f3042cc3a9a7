"""fullrange as ComfyUI custom nodes: **Tone** (the leak-aware start from a brightness, a colour, a reference image
or a tone-stats file), **Sigmas** (fullrange's step ladder for SamplerCustom) and **Model settings** (a checkpoint's
prediction type and zero terminal SNR from its markers or the probe, applied with ComfyUI's own
ModelSamplingDiscrete and RescaleCFG). They run inside ComfyUI's process, with fullrange installed in its Python;
the ``custom_nodes`` entry is :data:`CUSTOM_NODE_ENTRY`.

How ComfyUI's numbers relate to fullrange's (measured in ``tests/test_comfyui.py``):

- ComfyUI starts a sample at σ_0 as ``sqrt(1 + σ_0²)·noise + latent`` (at the schedule's top). With **Tone**'s
  latent L that is, in the VP units fullrange uses, ``noise + sqrt(ᾱ_T)·L``; fullrange starts from
  ``sqrt(1 - ᾱ_T)·noise + sqrt(ᾱ_T)·L`` (Everaert et al.), so ComfyUI's start carries ``1/sqrt(1 - ᾱ_T)`` more
  noise: 0.24 % at SD's ᾱ_T = 0.0047. The leak itself, ``sqrt(ᾱ_T)·L``, is the same.
- ComfyUI scales its noise by σ_0, so σ_0 = ∞ (zero terminal SNR) cannot reach its samplers: **Sigmas** starts
  its ladders at the model's own top instead, which ComfyUI's zero-SNR schedule caps at σ ≈ 4518.8 (ᾱ_T = 4.9e-8).
  fullrange's exact first step from σ = ∞ is the limit of that step; the cap makes it close, not equal.
- A flow model (SD3, Flux, or an SD UNet under ModelSamplingSD3) has ComfyUI's "sigma" = flow time τ and starts at
  τ = 1 exactly: **Sigmas** gives τ of fullrange's rectified-flow plan with the model's shift (SD3's ``shift``;
  Flux's ``exp(shift)``, its shift being μ).
"""

from __future__ import annotations

import torch

from .config import ConfigError
from .leak import from_low_frequencies, low_frequencies
from .schedules import Schedule, rectified_flow
from .timesteps import LADDERS, SPACINGS, plan

CATEGORY = "fullrange"
CUSTOM_NODE_ENTRY = "from fullrange.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401\n"
"""The whole of ``ComfyUI/custom_nodes/fullrange/__init__.py`` (ComfyUI loads a custom node folder as a package and
reads these two names)."""
COMFYUI_ZSNR_ALPHA_CUMPROD = 4.8973451890853435e-08
"""ᾱ_T of ComfyUI's zero-terminal-SNR schedule (its ``rescale_zero_terminal_snr_sigmas``): read as ᾱ_T = 0."""
PROBE_SIDE = 32
"""Latent side of the probe's noise (the probe's verdict does not depend on it)."""


def flow_shift(model_sampling) -> float | None:
    """The time shift of a ComfyUI flow model (its model sampling is CONST), ``None`` for the others: SD3's discrete
    flow takes ``shift`` as k, Flux's takes it as μ (k = exp(μ))."""
    import math

    import comfy.model_sampling as sampling

    if not isinstance(model_sampling, sampling.CONST):
        return None
    shift = float(model_sampling.shift)
    return math.exp(shift) if isinstance(model_sampling, sampling.ModelSamplingFlux) else shift


def comfy_schedule(model_sampling) -> Schedule:
    """fullrange's schedule of a ComfyUI model: rectified flow with its shift for a flow model, else ᾱ = 1 / (1 + σ²)
    of its discrete σ table, with ComfyUI's zero-SNR top read as what it stands for, ᾱ_T = 0."""
    shift = flow_shift(model_sampling)
    if shift is not None:
        return rectified_flow(shift)
    sigmas = model_sampling.sigmas.detach().double().cpu()
    alphas_cumprod = 1 / (1 + sigmas**2)
    if alphas_cumprod[-1] <= 2 * COMFYUI_ZSNR_ALPHA_CUMPROD:
        alphas_cumprod[-1] = 0.0
    return Schedule(alphas_cumprod)


def ladder_sigmas(model_sampling, steps: int, spacing: str, num_values: int | None) -> torch.Tensor:
    """The σ of fullrange's ``spacing`` plan on the model's schedule, then 0 (SamplerCustom's SIGMAS); σ = ∞ (the
    first step at zero terminal SNR) becomes the model's own top, ComfyUI's cap."""
    schedule = comfy_schedule(model_sampling)
    timesteps = plan(schedule, steps, spacing, num_values=num_values)
    if schedule.coordinates == "flow":  # ComfyUI's flow sigma is τ, 1 at pure noise: no cap needed
        tau = timesteps / schedule.num_train_timesteps
        return torch.cat([tau, tau.new_zeros(1)]).float()
    alphas_cumprod = schedule.alphas_cumprod_at(timesteps)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    sigmas = torch.where(torch.isinf(sigmas), float(model_sampling.sigma_max), sigmas)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def _cover(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A ComfyUI IMAGE (N, H, W, 3) resized to cover ``size`` (width, height) and centre-cropped, as
    :func:`fullrange.images.load_image` fits a file (antialiased bicubic here, Lanczos there)."""
    from .images import cover_crop

    (width, height), (left, top) = cover_crop((image.shape[2], image.shape[1]), size)
    resized = torch.nn.functional.interpolate(
        image.movedim(-1, 1), (height, width), mode="bicubic", antialias=True, align_corners=False
    )
    return resized[..., top : top + size[1], left : left + size[0]].clamp(0, 1).movedim(1, -1)


def _encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """ComfyUI's VAE on (N, H, W, 3) pixels in [0, 1]: raw latents (N, C, h, w), as VAEEncode gives them."""
    return vae.encode(pixels[..., :3])


def tone_latent(
    model, vae, size: tuple[int, int], batch: int, tone: str, image=None, tone_stats: str = "", seed: int = 0
) -> torch.Tensor:
    """The leak L of :mod:`fullrange.sd.tone` as a ComfyUI latent (raw VAE units, (batch, C, h, w) for ``size``
    (width, height) pixels), from exactly one of ``tone`` (a brightness in [0, 1] or #rrggbb), ``image`` (its
    lowest 3 × 3 DCT frequencies) and ``tone_stats`` (a fullrange tone-stats file; sample i drawn from stream
    ``SEED_STREAM + seed + i``, as ``fullrange sample`` draws it)."""
    from .sd.tone import SEED_STREAM, K, load_stats, parse_tone

    sources = {"tone": bool(tone.strip()), "image": image is not None, "tone_stats": bool(tone_stats)}
    given = [name for name, present in sources.items() if present]
    if len(given) != 1:
        named = ", ".join(given) or "none"
        raise ConfigError("tone", f"give exactly one of tone, image and tone_stats (given: {named})")
    ratio = vae.downscale_ratio
    h, w = size[1] // ratio, size[0] // ratio
    scale = model.model.latent_format.scale_factor  # fullrange's statistics are in the UNet's units
    if image is not None:
        latent = _encode(vae, _cover(image[:1, ..., :3], (w * ratio, h * ratio))).double()
        return from_low_frequencies(low_frequencies(latent, K), (h, w)).float().expand(batch, -1, -1, -1).clone()
    if tone_stats:
        stats = load_stats(tone_stats)
        draws = [stats.draw(1, (h, w), torch.Generator().manual_seed(SEED_STREAM + seed + i)) for i in range(batch)]
        return torch.cat(draws).float() / scale
    rgb = torch.tensor(parse_tone(tone)).view(1, 1, 1, 3)
    solid = rgb.expand(1, 8 * ratio, 8 * ratio, 3)
    return _encode(vae, solid).mean((-2, -1), keepdim=True).expand(batch, -1, h, w).clone()


def decide(model, path: str | None, prediction: str, zero_terminal_snr: str) -> tuple[str, bool, str]:
    """The prediction type and zero terminal SNR to sample with, and how they were settled: the node's choice, else
    the checkpoint's markers (``path``), else (prediction only) the probe: one UNet call at t = T-1 on seeded noise
    with zero conditioning (:mod:`fullrange.sd.inspection`)."""
    from .sd import markers
    from .sd.inspection import read_markers

    decision = markers.decide(read_markers(path)) if path else markers.Decision(None, None, ())
    how = []
    if prediction == "auto" and decision.prediction is not None:
        prediction = decision.prediction
        how.append(f"{prediction} from the markers")
    elif prediction == "auto":
        found = probe(model)
        prediction = found.prediction or "epsilon"
        how.append(f"{prediction} from the probe ({found.describe()})")
    else:
        how.append(f"{prediction} as set")
    if zero_terminal_snr == "auto":
        ztsnr = bool(decision.zero_terminal_snr)
        source = "markers" if decision.zero_terminal_snr is not None else "not marked"
        how.append(f"zero terminal SNR {'on' if ztsnr else 'off'} ({source})")
    else:
        ztsnr = zero_terminal_snr == "on"
        how.append(f"zero terminal SNR {zero_terminal_snr} as set")
    if ztsnr and prediction == "epsilon":
        raise ConfigError(
            "zero_terminal_snr", "is on with epsilon prediction, which says nothing at SNR = 0: use v_prediction"
        )
    return prediction, ztsnr, "; ".join(how)


@torch.no_grad()
def probe(model):
    """:class:`~fullrange.sd.inspection.Probe` of a ComfyUI model's UNet: raw output at t = T-1 for seeded noise."""
    from .sd.inspection import Probe

    unet = model.model.diffusion_model
    param = next(unet.parameters())
    x = torch.randn(1, unet.in_channels, PROBE_SIDE, PROBE_SIDE, generator=torch.Generator().manual_seed(0))
    steps = model.get_model_object("model_sampling").sigmas.numel()
    context = torch.zeros(1, 77, _context_dim(unet))
    adm = model.model.adm_channels
    y = torch.zeros(1, adm) if adm else None
    args = {"timesteps": torch.full((1,), steps - 1.0), "context": context.to(param)}
    out = unet(x.to(param), **args, **({"y": y.to(param)} if y is not None else {}))
    return Probe.of(out.float().cpu(), x)


def _context_dim(unet) -> int:
    """Cross-attention width: the in-features of the first cross-attention key projection."""
    return next(m.in_features for n, m in unet.named_modules() if n.endswith("attn2.to_k"))


class Tone:
    """A latent for KSampler (denoise 1) or SamplerCustom whose first step carries a tone's leak."""

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 512, "min": 16, "max": 16384, "step": 8}
        return {
            "required": {
                "model": ("MODEL",),
                "vae": ("VAE",),
                "tone": ("STRING", {"default": "0.1", "tooltip": "a brightness in [0, 1] or #rrggbb, or empty"}),
                "width": ("INT", size),
                "height": ("INT", size),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "start from this image's tones and layout (its lowest frequencies)"}),
                "tone_stats": ("STRING", {"default": "", "tooltip": "a file of fullrange tone-stats"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1, "tooltip": "draws from tone_stats"}),
            },
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = CATEGORY
    DESCRIPTION = "The leak-aware start of fullrange sample --tone / --tone-image / --tone-stats, as a latent."

    def make(self, model, vae, tone, width, height, batch_size, image=None, tone_stats="", seed=0):
        return ({"samples": tone_latent(model, vae, (width, height), batch_size, tone, image, tone_stats, seed)},)


class Sigmas:
    """fullrange's step ladder for SamplerCustom."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "steps": ("INT", {"default": 25, "min": 1, "max": 10000}),
                "spacing": ([*SPACINGS, *LADDERS], {"default": "trailing"}),
            },
            "optional": {"latent": ("LATENT", {"tooltip": "tops karras / exponential ladders by the latent's size"})},
        }

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "make"
    CATEGORY = CATEGORY
    DESCRIPTION = "fullrange's ladder; at zero terminal SNR it starts at ComfyUI's cap (σ ≈ 4518.8), not σ = ∞."

    def make(self, model, steps, spacing, latent=None):
        num_values = None
        if latent is not None and spacing in LADDERS:
            num_values = int(torch.tensor(latent["samples"].shape[1:]).prod())
        return (ladder_sigmas(model.get_model_object("model_sampling"), steps, spacing, num_values),)


class ModelSettings:
    """A loaded model set to sample as it must: prediction type and zero terminal SNR (ModelSamplingDiscrete),
    RescaleCFG where it is zero-terminal-SNR."""

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {
            "required": {
                "model": ("MODEL",),
                "ckpt_name": (["(none)", *folder_paths.get_filename_list("checkpoints")],),
                "prediction": (["auto", "epsilon", "v_prediction"],),
                "zero_terminal_snr": (["auto", "on", "off"],),
                "rescale": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.01}),
            }
        }

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "settings")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = "Reads the checkpoint's markers (or probes the UNet) like fullrange inspect, and applies them."

    def apply(self, model, ckpt_name, prediction, zero_terminal_snr, rescale):
        import folder_paths
        from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete, RescaleCFG

        path = None if ckpt_name == "(none)" else folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        prediction, ztsnr, how = decide(model, path, prediction, zero_terminal_snr)
        sampling = "v_prediction" if prediction == "v_prediction" else "eps"
        (model,) = ModelSamplingDiscrete().patch(model, sampling, ztsnr)
        if ztsnr and rescale > 0:
            (model,) = RescaleCFG().patch(model, rescale)
            how += f"; RescaleCFG {rescale}"
        return model, how


NODE_CLASS_MAPPINGS = {"FullrangeTone": Tone, "FullrangeSigmas": Sigmas, "FullrangeModelSettings": ModelSettings}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FullrangeTone": "Tone (fullrange)",
    "FullrangeSigmas": "Sigmas (fullrange)",
    "FullrangeModelSettings": "Model settings (fullrange)",
}
