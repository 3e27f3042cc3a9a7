"""``fullrange.sample``: what a model needs to be sampled right (:class:`SamplingSpec`), and the call that does it:
plan the steps, wrap the network into a denoiser, apply guidance, run a solver."""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
import warnings
from dataclasses import asdict, dataclass, replace

import torch

from . import leak as signal_leak
from . import samplers, schedules
from .denoiser import from_model
from .guidance import CFG_PP_SAMPLERS, Shaping, cfg, cfg_pp_scales
from .prediction import check_prediction
from .samplers import Callback, Hook, prepare
from .timesteps import SPACINGS, plan

DEFAULT_SAMPLER = "ddim"
"""The sampler ``fullrange.sample`` uses when none is given, on trailing steps (:func:`pick`): on the trained
zero-terminal-SNR models of ``benchmarks/nfe_trained.py`` nothing was closer to the data at 4, 6 and 8 steps. On the
exact toys of ``benchmarks/nfe_frontier.py`` UniPC on a Karras ladder topped by the latent size is far ahead; it is
one option away (``sampler="unipc", spacing="karras"``). The README's "Few-step sampling" has both."""


@dataclass(frozen=True, eq=False)
class SamplingSpec:
    """A model's sampling setup, its single source of truth: the noise ``schedule`` it was trained on, what it
    predicts (``"epsilon"``, ``"v_prediction"``, ``"sample"``), and the step ``spacing`` it is sampled with
    (``steps_offset`` is added to leading steps, as diffusers does; SD uses 1).

    Zero terminal SNR with epsilon prediction is refused: at SNR = 0 eps says nothing about x0 (Lin et al. §3.2).
    """

    schedule: schedules.Schedule
    prediction: str
    spacing: str = "trailing"
    steps_offset: int = 0

    def __post_init__(self) -> None:
        check_prediction(self.prediction)
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}; choose one of {', '.join(SPACINGS)}")
        if self.steps_offset < 0:
            raise ValueError(f"steps_offset must be >= 0, got {self.steps_offset}")
        if self.schedule.zero_terminal_snr and self.prediction == "epsilon":
            raise ValueError(
                "zero terminal SNR with epsilon prediction: at SNR = 0 eps says nothing about x0; "
                "use v_prediction (Lin et al. §3.2)"
            )

    def plan(self, num_steps: int, spacing: str | None = None, num_values: int | None = None) -> torch.Tensor:
        """The steps to visit: ``num_steps`` spaced by ``spacing`` (default: the spec's; also a σ ladder,
        "karras" or "exponential", topped by ``num_values``, the sample's C·H·W, at zero terminal SNR: see
        :func:`fullrange.timesteps.ladder`). Leading steps at zero terminal SNR warn: they never visit t = T-1."""
        spacing = spacing or self.spacing
        if self.schedule.zero_terminal_snr and spacing == "leading":
            warnings.warn(
                "zero terminal SNR with leading spacing never visits t = T-1, where the model learnt pure "
                "noise; use trailing or linspace (Lin et al. §3.3)",
                stacklevel=2,
            )
        return plan(self.schedule, num_steps, spacing, self.steps_offset, num_values)

    def describe(self) -> dict:
        """JSON for files and checkpoints: the schedule's origin and a fingerprint of its ᾱ, and the rest."""
        ac = self.schedule.alphas_cumprod
        origin = self.schedule.origin
        return {
            "schedule": asdict(origin) if origin is not None else None,
            "alphas_cumprod_sha256": hashlib.sha256(ac.numpy().tobytes()).hexdigest()[:16],
            "prediction": self.prediction,
            "spacing": self.spacing,
            "steps_offset": self.steps_offset,
        }


def retrained(spec: SamplingSpec, prediction: str | None = None, zero_terminal_snr: bool | None = None) -> SamplingSpec:
    """``spec`` for a model that predicts ``prediction`` and was trained with or without zero terminal SNR (``None``
    keeps the spec's): the schedule is rebuilt from its origin, and zero terminal SNR takes trailing steps."""
    schedule = spec.schedule
    if zero_terminal_snr is not None and zero_terminal_snr != schedule.zero_terminal_snr:
        if schedule.origin is None:
            raise ValueError("this schedule was not built by name, so it cannot be rebuilt with another terminal SNR")
        schedule = schedules.from_origin(replace(schedule.origin, zero_terminal_snr=zero_terminal_snr))
    spacing, offset = ("trailing", 0) if schedule.zero_terminal_snr else (spec.spacing, spec.steps_offset)
    return SamplingSpec(schedule, prediction or spec.prediction, spacing, offset)


STABLE_DIFFUSION = SamplingSpec(schedules.scaled_linear(), "epsilon", "leading", steps_offset=1)
"""Stable Diffusion 1.x / 2.x-base as published: scaled_linear betas, epsilon prediction, leading steps + 1."""

ZERO_TERMINAL_SNR = replace(
    STABLE_DIFFUSION,
    schedule=schedules.rescale_zero_terminal_snr(STABLE_DIFFUSION.schedule),
    prediction="v_prediction",
    spacing="trailing",
)
"""Lin et al.'s fix of Stable Diffusion's sampling: the same betas rescaled to zero terminal SNR, v-prediction,
trailing steps."""


def _steps(steps) -> int | torch.Tensor:
    """``steps`` as a count (any integer: an int, a numpy integer) or a 1-D tensor of timesteps; anything else (a
    float, a 0-d tensor, a bool) is a ValueError, not one step at t = steps."""
    if isinstance(steps, numbers.Integral) and not isinstance(steps, bool):
        return int(steps)
    if isinstance(steps, torch.Tensor | list | tuple):
        t = torch.as_tensor(steps)
        if t.ndim == 1 and t.numel() > 0 and not t.dtype.is_complex and t.dtype != torch.bool:
            return t
    raise ValueError(f"steps must be a count (an int) or a 1-D sequence of descending timesteps, got {steps!r}")


ZERO_SNR_RESCALE = 0.7
"""Lin et al.'s guidance rescale φ at zero terminal SNR (their §3.4), the default of :func:`sample` there."""


def default_rescale(spec: SamplingSpec, shaping: Shaping | None = None) -> float:
    """The guidance rescale φ :func:`sample` uses where none is given: :data:`ZERO_SNR_RESCALE` at zero terminal SNR,
    where guidance over-exposes (measured in ``fullrange reproduce`` and ``benchmarks/nfe_trained.py``), else 0; 0
    for CFG++, whose λ <= 1 interpolates between the branches instead of extrapolating, and for rectified flow (SD3,
    Flux: sampled without a rescale by their authors; fullrange has not measured one there)."""
    cfg_pp = shaping is not None and shaping.cfg_pp
    measured = spec.schedule.coordinates == "vp"  # not measured on rectified-flow models: they keep their authors' 0
    return ZERO_SNR_RESCALE if spec.schedule.zero_terminal_snr and measured and not cfg_pp else 0.0


def pick(spec: SamplingSpec, sampler: str | None = None, spacing: str | None = None):
    """``(sampler, spacing, note)``: what :func:`sample` uses where ``sampler`` / ``spacing`` are not given, and one
    line saying what it picked (``""`` if nothing was picked): :data:`DEFAULT_SAMPLER` on trailing steps, which start
    at t = T-1 whatever the model's own spacing (Lin et al. §3.3; in ``fullrange reproduce`` closer to the data than
    leading on the model trained with SD's recipe, and the best on the trained zero-terminal-SNR models).
    """
    picked = []
    if sampler is None:
        sampler = DEFAULT_SAMPLER
        picked.append(f"sampler {sampler}")
    if spacing is None:
        spacing = "trailing"
        picked.append("trailing steps from pure noise")
    note = f"fullrange picked {' and '.join(picked)} (benchmarks/nfe_trained.py)" if picked else ""
    if isinstance(spec.schedule, schedules.RectifiedFlow) and spacing == "trailing":
        shift = f"rectified flow: trailing steps with the model's time shift {spec.schedule.shift:g}"
        note = f"{note}; {shift}" if note else shift
    return sampler, spacing, note


def sample(
    model,
    noise: torch.Tensor,
    spec: SamplingSpec,
    *,
    sampler: str | None = None,
    steps: int | torch.Tensor = 25,
    spacing: str | None = None,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    uncond: dict | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float | None = None,
    rescale_space: str = "v",
    shaping: Shaping | None = None,
    callback: Callback | None = None,
    hook: Hook | None = None,
    leak: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """Sample x0 from ``noise`` (the x_t at the first step) with a network called like a diffusers UNet,
    ``model(x_t, t, **cond)``, sampled as ``spec`` says.

    ``sampler``: a name of :data:`fullrange.samplers.SAMPLERS`; ``None`` picks one (:func:`pick`, logged at INFO).
    ``steps``: a count, spaced by ``spacing`` ("leading" / "linspace" / "trailing", or a σ ladder "karras" /
    "exponential", topped by the noise's C·H·W at zero terminal SNR; ``None`` picks one, :func:`pick`), or an
    explicit descending tensor of timesteps.
    ``cond`` / ``uncond``: keyword arguments for the model (tensors, or dicts of them such as SDXL's
    ``added_cond_kwargs``); with ``guidance_scale != 1`` the model also runs on ``uncond`` (classifier-free
    guidance) and ``guidance_rescale`` is Lin et al.'s φ applied in ``rescale_space`` (``None``:
    :func:`default_rescale`); ``shaping`` changes how the
    two branches combine (APG, CFG-Zero*, a guidance interval, frequency-decoupled scales:
    :class:`fullrange.guidance.Shaping`), or CFG++ (``guidance_scale`` is then its λ, for ddim and euler).
    ``callback(StepInfo)`` runs after each step (progress bars); ``hook(x, alpha_cumprod) -> x`` edits the latents
    after every step (blended inpainting). Other ``options`` are the sampler's own (``SAMPLERS[name].knobs``), e.g.
    ``eta`` for ddim.
    ``leak``: the x0 content L the first step should carry (broadcast against ``noise``): the sampler starts
    from ``sqrt(ᾱ_first) L + sqrt(1 - ᾱ_first) noise`` at its actual first step (Everaert et al. 2024). At
    ᾱ_first = 0 (zero terminal SNR from t = T-1), where nothing leaks, L's lowest frequencies replace those of the
    model's first prediction instead (:func:`fullrange.leak.steer`), and an INFO line says so.
    """
    steps = _steps(steps)
    explicit_steps = not isinstance(steps, int)
    sampler, spacing, note = pick(spec, sampler, spec.spacing if explicit_steps else spacing)
    if note:
        logging.getLogger("fullrange").info(note)
    solver = samplers.get(sampler, options)
    if isinstance(steps, int):
        steps = spec.plan(steps, spacing, num_values=math.prod(noise.shape[1:]))
    steered = False
    if leak is not None:
        first = torch.as_tensor(steps, dtype=torch.float64).flatten()[:1].cpu()
        alpha_cumprod = float(spec.schedule.alphas_cumprod_at(first)[0])
        steered = alpha_cumprod == 0
        if steered:  # nothing leaks at zero SNR: the tone goes into the model's first prediction instead
            logging.getLogger("fullrange").info(
                f"the first step (t = {float(first[0]):g}) is at zero SNR, where nothing leaks: the tone replaces the "
                "lowest frequencies of the model's first prediction"
            )
        else:
            noise = signal_leak.start(noise, leak, alpha_cumprod)
    denoiser = from_model(model, spec.prediction, spec.schedule.coordinates)
    scale = guidance_scale
    if shaping is not None and shaping.cfg_pp:
        if sampler not in CFG_PP_SAMPLERS or options.get("eta", 0.0) != 0:
            raise ValueError(f"CFG++ is defined here for {' and '.join(CFG_PP_SAMPLERS)} (η = 0), not {sampler!r}")
        ladder = prepare(spec.schedule, steps)
        sigmas = [ladder.sigma(i) for i in range(ladder.num_steps + 1)]
        scale = cfg_pp_scales(guidance_scale, ladder.t, sigmas).__getitem__
    if scale != 1.0:
        phi = default_rescale(spec, shaping) if guidance_rescale is None else guidance_rescale
        if guidance_rescale is None and phi:
            logging.getLogger("fullrange").info(f"fullrange picked guidance rescale {phi:g} (zero terminal SNR)")
        denoiser = cfg(denoiser, scale, uncond, phi, rescale_space, shaping)
    if steered:
        denoiser = signal_leak.steer(denoiser, leak)
    with torch.no_grad():
        return solver(
            denoiser,
            noise,
            spec.schedule,
            steps,
            cond=cond,
            generator=generator,
            callback=callback,
            hook=hook,
            **options,
        )
