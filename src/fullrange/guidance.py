"""Classifier-free guidance (Ho & Salimans 2022), its rescale (Lin et al. 2024, eq. 14-16), and the later
training-free changes to how its two branches combine (:class:`Shaping`), each reducing to plain CFG at its
neutral setting.

Guidance wraps a denoiser into a denoiser; samplers never see a guidance scale. CFG++ changes the sampler's update
instead; on the steps it is defined for it equals CFG with a scale that varies per step (:func:`cfg_pp_scales`).

In which space the rescale works matters: guidance itself is affine in the model output, so it is the
same in eps, v and x0 space, but the std ratio of eq. 15 is not. The paper rescales the raw v output of
a v-prediction model; diffusers rescales the raw output whatever its type; ComfyUI converts to v first.
fullrange converts to v by default (``v = (sqrt(ᾱ) x_t - x0) / sqrt(1 - ᾱ)``, finite at SNR = 0), so the
same φ means the same thing for eps, v and x0 models, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .denoiser import Denoiser, map_cond
from .leak import BAND, low_band
from .prediction import from_v, to_v

RESCALE_SPACES = ("v", "x0")
STD_EPS = 1e-12
"""Floor on std(x_cfg) in eq. 15: a constant (zero-std) guided output is left unscaled, not divided by 0."""


def rescale(guided: torch.Tensor, positive: torch.Tensor, phi: float) -> torch.Tensor:
    """Eq. 15-16: ``phi · guided · std(positive) / std(guided) + (1 - phi) · guided``, std per sample."""
    dims = tuple(range(1, guided.ndim))
    std_pos = positive.std(dim=dims, keepdim=True)
    std_cfg = guided.std(dim=dims, keepdim=True)
    ratio = torch.where(std_cfg > STD_EPS, std_pos / std_cfg.clamp(min=STD_EPS), torch.ones_like(std_cfg))
    return phi * guided * ratio + (1 - phi) * guided


@dataclass(frozen=True)
class Shaping:
    """How the guidance term ``d = x_pos - x_neg`` is shaped before ``x_neg + w d``; every default is plain CFG.

    - ``interval``: guidance only where ``lo < σ <= hi`` (Kynkäänniemi et al. 2024), σ = sqrt((1 - ᾱ) / ᾱ); elsewhere
      the positive branch alone (and the negative one is not evaluated). σ = ∞ at zero terminal SNR.
    - ``zero_star``: the negative branch scaled by ``s* = <x_pos, x_neg> / ||x_neg||²`` per sample (CFG-Zero*, Fan et
      al. 2025), the scale that best fits it to the positive one.
    - APG (Sadat et al., ICLR 2025): ``momentum`` β (``d ← d + β d_prev``), ``norm_threshold`` r (``d ← d ·
      min(1, r / ||d||)``, 0: none), and ``eta``: the weight of d's component parallel to ``x_pos``, the one the
      paper finds to over-saturate (1 keeps it, 0 drops it).
    - ``low_scale``: frequency-decoupled guidance (Sadat et al. 2025): the guidance scale of d's lowest
      :data:`fullrange.leak.BAND` × BAND DCT frequencies (brightness, colour cast), where ``w`` keeps the rest
      (``None``: ``w`` for all).
    - ``zero_init``: CFG-Zero*'s zero-init, the first ``zero_init`` steps predict zero flow velocity (``u = eps - x0 =
      0``, so ``x0 = x_t / (sqrt(ᾱ) + sqrt(1 - ᾱ))``) without running the model: the paper's ``v = 0`` for a flow
      model, the same point of the ODE for any other.
    - ``cfg_pp``: CFG++ (Chung et al., ICLR 2025), ``w`` being its λ in [0, 1]: each DDIM / Euler step re-noises with
      the unconditional prediction (:func:`cfg_pp_scales`; :func:`fullrange.sample` applies it).

    Norms and projections are per sample over all other dimensions, in the space guidance runs in."""

    interval: tuple[float, float] = (0.0, math.inf)
    zero_star: bool = False
    momentum: float = 0.0
    norm_threshold: float = 0.0
    eta: float = 1.0
    low_scale: float | None = None
    zero_init: int = 0
    cfg_pp: bool = False

    def __post_init__(self) -> None:
        lo, hi = self.interval
        if not 0 <= lo < hi:
            raise ValueError(f"guidance interval must satisfy 0 <= lo < hi, got {self.interval}")
        if self.norm_threshold < 0:
            raise ValueError(f"norm_threshold must be >= 0, got {self.norm_threshold}")
        if self.zero_init < 0:
            raise ValueError(f"zero_init must be >= 0, got {self.zero_init}")

    def guides_at(self, alpha_cumprod: float) -> bool:
        """Whether guidance applies at ``ᾱ`` (σ inside the interval)."""
        sigma = math.inf if alpha_cumprod <= 0 else math.sqrt((1 - alpha_cumprod) / alpha_cumprod)
        return self.interval[0] < sigma <= self.interval[1]


def _per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a, b>`` per sample, shaped to broadcast against them."""
    return (a * b).flatten(1).sum(1).view(-1, *[1] * (a.ndim - 1))


def combine(
    negative: torch.Tensor, positive: torch.Tensor, scale: float, shaping: Shaping, state: dict | None = None
) -> torch.Tensor:
    """``x_neg + w d``, with ``d = x_pos - x_neg`` shaped as ``shaping`` says; ``state`` carries APG's running
    average from one call to the next."""
    if shaping.zero_star:  # eps guards an all-zero negative branch
        negative = negative * _per_sample(positive, negative) / (_per_sample(negative, negative) + 1e-8)
    d = positive - negative
    if shaping.momentum:
        d = d + shaping.momentum * state["running"] if "running" in state else d
        state["running"] = d
    if shaping.norm_threshold > 0:
        norm = _per_sample(d, d).sqrt()
        d = d * torch.clamp(shaping.norm_threshold / norm.clamp(min=1e-12), max=1.0)
    if shaping.eta != 1.0:  # the projection in float64, as the paper's code computes it
        unit = positive.double() / _per_sample(positive.double(), positive.double()).sqrt().clamp(min=1e-12)
        parallel = (_per_sample(d.double(), unit) * unit).to(d.dtype)
        d = d - parallel + shaping.eta * parallel
    out = negative + scale * d
    if shaping.low_scale is not None and shaping.low_scale != scale:
        out = out + (shaping.low_scale - scale) * low_band(d, BAND)
    return out


CFG_PP_SAMPLERS = ("ddim", "euler")
"""The samplers CFG++ is defined for here: the deterministic first-order step (DDIM at η = 0, which is Euler in σ)."""


def cfg_pp_scales(lam: float, t: Sequence[float], sigma: Sequence[float]) -> dict[float, float]:
    """CFG++ (Chung et al., ICLR 2025, Algorithm 1) as CFG scales per step: ``{t_i: w_i}`` for the steps at ``t``
    with ``σ = sqrt((1 - ᾱ) / ᾱ)`` (``sigma`` has one more entry, the end: 0).

    CFG++ steps ``x' = a' x0_λ + s' eps_∅`` (``x0_λ`` guided with scale λ, ``eps_∅`` the unconditional eps
    ``(x - a x0_∅) / s``). DDIM's ``x' = a' x0 + s' (x - a x0) / s`` gives the same x' for
    ``x0 = x0_∅ + w (x0_c - x0_∅)`` with ``w = λ σ / (σ - σ')``: solve
    ``(a' - s' a / s) x0 = a' x0_λ - (s' a / s) x0_∅`` and divide by a'. At σ = ∞ (zero SNR) and at the last step
    (σ' = 0) it is λ; in between it is larger."""
    if not 0 <= lam <= 1:
        raise ValueError(f"CFG++ takes a guidance scale λ in [0, 1], got {lam}")
    scales = {}
    for i, step in enumerate(t):
        now, after = sigma[i], sigma[i + 1]
        scales[step] = lam if math.isinf(now) else lam * now / (now - after)
    return scales


def cfg(
    denoiser: Denoiser,
    scale: float | Callable[[float], float],
    uncond: dict | None = None,
    guidance_rescale: float = 0.0,
    space: str = "v",
    shaping: Shaping | None = None,
) -> Denoiser:
    """``x_neg + w (x_pos - x_neg)`` with optional rescale ``phi`` (eq. 14-16) in ``space`` ("v" or "x0"), the
    guidance term shaped as ``shaping`` says (:func:`combine`; default: plain CFG). ``scale`` is w, or a function of
    the timestep giving it (CFG++: :func:`cfg_pp_scales`).

    The positive branch gets the caller's ``**cond``, the negative one ``uncond`` (same keys, tensors
    concatenated so both run as one batch; nested dicts alike).
    """
    if space not in RESCALE_SPACES:
        raise ValueError(f"unknown guidance rescale space {space!r}; choose one of {', '.join(RESCALE_SPACES)}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    uncond, shaping, state = uncond or {}, shaping or Shaping(), {"steps": []}
    scale_at = scale if callable(scale) else lambda t: scale

    def guided(x: torch.Tensor, t: float, alpha_cumprod: float, **cond) -> torch.Tensor:
        if t not in state["steps"]:
            state["steps"].append(t)
        if state["steps"].index(t) < shaping.zero_init:  # zero flow velocity: eps = x0, x_t = (a + s) x0
            return x / (math.sqrt(alpha_cumprod) + math.sqrt(1 - alpha_cumprod))
        if not shaping.guides_at(alpha_cumprod):
            return denoiser(x, t, alpha_cumprod, **cond)
        both = map_cond(lambda negative, positive: torch.cat([negative, positive]), uncond, cond)
        negative, positive = denoiser(torch.cat([x, x]), t, alpha_cumprod, **both).chunk(2)
        if space == "v":
            negative, positive = to_v(negative, x, alpha_cumprod), to_v(positive, x, alpha_cumprod)
        # Plain CFG is affine: the same image in eps, v or x0 space; the shaping's norms and projections are not.
        out = combine(negative, positive, scale_at(t), shaping, state)
        if guidance_rescale > 0:  # the std ratio is not affine: it depends on the space (module docstring)
            out = rescale(out, positive, guidance_rescale)
        return from_v(out, x, alpha_cumprod) if space == "v" else out

    return guided
