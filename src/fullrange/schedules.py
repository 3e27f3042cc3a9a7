"""Noise schedules: ᾱ_t builders, zero-terminal-SNR rescaling, resolution shift, rectified flow and its shifts.

Notation (DDPM, 0-indexed): ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) eps`` for ``t`` in ``0..T-1``,
``SNR(t) = ᾱ_t / (1 - ᾱ_t)``, k-diffusion ``sigma_t = sqrt((1 - ᾱ_t) / ᾱ_t)``.
Rectified flow (SD3, Flux) has continuous ``t`` in ``[0, T]`` and flow time ``tau = t / T``:
``x = (1 - tau) x0 + tau eps`` is the variance-preserving point with ``sqrt(ᾱ) = (1 - tau) / r`` scaled by
``r = sqrt((1 - tau)² + tau²)``, so its SNR is 0 at ``t = T`` and ``sigma = tau / (1 - tau)``.
Everything is float64; cast at the boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine", "rectified_flow")


@dataclass(frozen=True)
class Origin:
    """How a named builder made a schedule: enough to name it again (in a diffusers scheduler config, say)."""

    name: str  # one of SCHEDULE_NAMES
    num_train_timesteps: int
    beta_start: float | None = None
    beta_end: float | None = None
    zero_terminal_snr: bool = False
    shift: float | None = None  # rectified flow's time shift


@dataclass(frozen=True, eq=False)
class Schedule:
    """An immutable noise schedule: ``alphas_cumprod`` (ᾱ_t, float64, shape (T,), decreasing).

    ``origin`` says which named builder made it; ``None`` for schedules no name describes (custom ᾱ, a resolution
    shift, the unclipped cosine).
    """

    alphas_cumprod: torch.Tensor
    origin: Origin | None = None

    coordinates: ClassVar[str] = "vp"
    """What the network sees: ``"vp"``, ``x_t`` itself; ``"flow"``, the flow interpolant (:class:`RectifiedFlow`)."""

    def __post_init__(self) -> None:
        ac = self.alphas_cumprod
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got shape {tuple(ac.shape)}")
        ac = ac.detach().to(dtype=torch.float64, device="cpu").clone()
        if not bool(((ac >= 0) & (ac < 1)).all()):
            raise ValueError("alphas_cumprod must lie in [0, 1)")
        if not bool((ac[1:] <= ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be non-increasing in t")
        if bool((ac[:-1] == 0).any()):
            raise ValueError("only the last timestep may have alphas_cumprod == 0 (zero terminal SNR)")
        ac.requires_grad_(False)
        object.__setattr__(self, "alphas_cumprod", ac)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def timesteps(self) -> torch.Tensor:
        """The training timestep of each ``alphas_cumprod`` entry: ``0..T-1`` (the last is the noisiest)."""
        return torch.arange(self.num_train_timesteps, dtype=torch.float64)

    @property
    def betas(self) -> torch.Tensor:
        """``beta_t = 1 - ᾱ_t / ᾱ_{t-1}`` with ``ᾱ_{-1} = 1``."""
        ac = self.alphas_cumprod
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        return 1 - ac / prev

    @property
    def snr(self) -> torch.Tensor:
        """``SNR(t) = ᾱ_t / (1 - ᾱ_t)``; 0 at zero terminal SNR."""
        return self.alphas_cumprod / (1 - self.alphas_cumprod)

    @property
    def log_snr(self) -> torch.Tensor:
        """``log SNR(t)``; ``-inf`` at zero terminal SNR."""
        return torch.log(self.snr)

    @property
    def sigmas(self) -> torch.Tensor:
        """k-diffusion ``sigma_t = sqrt((1 - ᾱ_t) / ᾱ_t)``; ``inf`` at zero terminal SNR."""
        return self.snr.rsqrt()

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    def alphas_cumprod_at(self, t: torch.Tensor | float) -> torch.Tensor:
        """ᾱ at (possibly fractional) timesteps, linear in log SNR between integers (exact at integers)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if bool(((t < 0) | (t > self.num_train_timesteps - 1)).any()):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {t.tolist()}")
        lo = t.floor().long()
        hi = torch.clamp(lo + 1, max=self.num_train_timesteps - 1)
        frac = t - lo
        log_snr = self.log_snr
        # An integer t takes its value exactly, which also keeps -inf (zero terminal SNR) finite-safe.
        mix = torch.where(frac == 0, log_snr[lo], (1 - frac) * log_snr[lo] + frac * log_snr[hi])
        return torch.sigmoid(mix)

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Fractional timestep of a k-diffusion sigma, linear in log sigma (the inverse of ``alphas_cumprod_at``)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_sigmas = self.sigmas.log()
        finite = log_sigmas[torch.isfinite(log_sigmas)]
        log_sigma = sigma.log()
        if bool(((log_sigma < finite[0]) | (log_sigma > finite[-1])).any()):
            raise ValueError(
                f"sigma must lie in [{finite[0].exp().item():.6g}, {finite[-1].exp().item():.6g}] "
                f"(the schedule's finite range), got {sigma.tolist()}"
            )
        hi = torch.searchsorted(finite, log_sigma).clamp(1, finite.numel() - 1)
        lo = hi - 1
        frac = (log_sigma - finite[lo]) / (finite[hi] - finite[lo])
        return lo.to(torch.float64) + frac


@dataclass(frozen=True, eq=False)
class RectifiedFlow(Schedule):
    """Rectified flow (Liu et al. 2023; SD3, Esser et al. 2024): ``x = (1 - tau) x0 + tau eps``, ``tau = t / T``
    continuous in ``[0, 1]``, SNR = 0 at ``t = T`` by construction.

    ``alphas_cumprod`` tabulates ᾱ at the training timesteps ``t = 1..T`` (diffusers' ``tau = k / T``); between them
    ᾱ is exact, not interpolated. The network sees the interpolant ``x_t / (sqrt(ᾱ) + sqrt(1 - ᾱ))`` and ``t``
    (diffusers' timestep ``tau · T``). ``origin.shift`` is the model's time shift (:func:`shift_time`), used where
    steps or training times are drawn; it does not change ᾱ(t).
    """

    coordinates: ClassVar[str] = "flow"

    @property
    def shift(self) -> float:
        return 1.0 if self.origin is None or self.origin.shift is None else self.origin.shift

    @property
    def timesteps(self) -> torch.Tensor:
        return torch.arange(1, self.num_train_timesteps + 1, dtype=torch.float64)

    def alphas_cumprod_at(self, t: torch.Tensor | float) -> torch.Tensor:
        """ᾱ at continuous ``t`` in ``[0, T]``: ``(1 - tau)² / ((1 - tau)² + tau²)``, exact."""
        t = torch.as_tensor(t, dtype=torch.float64)
        T = self.num_train_timesteps
        if bool(((t < 0) | (t > T)).any()):
            raise ValueError(f"timesteps must lie in [0, {T}], got {t.tolist()}")
        return _flow_alphas_cumprod(t / T)

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """``t = T · sigma / (1 + sigma)`` (``tau = sigma / (1 + sigma)``; ``sigma = inf`` is ``t = T``)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if bool((sigma < 0).any()):
            raise ValueError(f"sigma must be >= 0, got {sigma.tolist()}")
        tau = torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))
        return self.num_train_timesteps * tau


def _flow_alphas_cumprod(tau: torch.Tensor) -> torch.Tensor:
    return (1 - tau) ** 2 / ((1 - tau) ** 2 + tau**2)


def rectified_flow(shift: float = 1.0, num_train_timesteps: int = 1000) -> RectifiedFlow:
    """The rectified-flow schedule with time shift ``shift`` (1: none; SD3 uses 3, Flux a shift per image size)."""
    _check_T(num_train_timesteps)
    check_shift(shift)
    tau = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    origin = Origin("rectified_flow", num_train_timesteps, zero_terminal_snr=True, shift=float(shift))
    return RectifiedFlow(_flow_alphas_cumprod(tau), origin)


def check_shift(shift: float) -> float:
    if not (isinstance(shift, int | float) and 0 < shift < math.inf):
        raise ValueError(f"shift must be a positive number, got {shift!r}")
    return float(shift)


def shift_time(tau: torch.Tensor | float, shift: float) -> torch.Tensor:
    """SD3's time shift ``k tau / (1 + (k - 1) tau)`` (Esser et al. 2024, eq. 23).

    In k-diffusion's coordinates it is exactly ``sigma -> k sigma`` (``sigma = tau / (1 - tau)``), the same move as
    topping a σ ladder at a larger :func:`fullrange.timesteps.resolution_sigma_max`. Flux's exponential shift by μ is
    ``k = exp(μ)`` (:func:`flux_shift`), diffusers' linear one ``k = μ``."""
    tau = torch.as_tensor(tau, dtype=torch.float64)
    return shift * tau / (1 + (shift - 1) * tau)


def resolution_shift(num_values: int, base_num_values: int, base_shift: float = 1.0) -> float:
    """SD3's resolution rule: ``k = base_shift · sqrt(m / n)`` for ``m`` values per sample against the ``n`` of the
    resolution the shift ``base_shift`` was set for (Esser et al. 2024, §5.3.2)."""
    if num_values < 1 or base_num_values < 1:
        raise ValueError(f"num_values must be positive, got {num_values} and {base_num_values}")
    return check_shift(base_shift) * math.sqrt(num_values / base_num_values)


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's μ, linear in the number of 2×2 latent patches (diffusers' ``calculate_shift``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def flux_shift(image_seq_len: int, **rule) -> float:
    """Flux's dynamic shift as a static one: its time shift ``exp(μ) / (exp(μ) + 1/tau - 1)`` is
    :func:`shift_time` with ``k = exp(μ)`` (:func:`flux_mu`)."""
    return math.exp(flux_mu(image_seq_len, **rule))


def with_shift(schedule: RectifiedFlow, shift: float) -> RectifiedFlow:
    """``schedule`` with another time shift (the same ᾱ(t): the shift decides only which t are visited or drawn)."""
    check_shift(shift)
    origin = schedule.origin or Origin("rectified_flow", schedule.num_train_timesteps, zero_terminal_snr=True)
    return RectifiedFlow(schedule.alphas_cumprod, replace(origin, shift=float(shift)))


def from_betas(betas: torch.Tensor, origin: Origin | None = None) -> Schedule:
    """Schedule from betas: ``ᾱ_t = prod_{s<=t} (1 - beta_s)`` (DDPM eq. 4)."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    return Schedule(torch.cumprod(1 - betas, dim=0), origin)


def linear(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """DDPM's linear betas (Ho et al. 2020)."""
    _check_T(num_train_timesteps)
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return from_betas(betas, Origin("linear", num_train_timesteps, beta_start, beta_end))


def scaled_linear(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Schedule:
    """Stable Diffusion's schedule: ``betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``."""
    _check_T(num_train_timesteps)
    root = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps, dtype=torch.float64)
    return from_betas(root**2, Origin("scaled_linear", num_train_timesteps, beta_start, beta_end))


def cosine(num_train_timesteps: int = 1000, s: float = 0.008, clip: bool = True) -> Schedule:
    """iDDPM cosine schedule ``ᾱ(t) = f(t)/f(0)``, ``f(t) = cos((t/T + s)/(1 + s) · π/2)²`` (Nichol & Dhariwal).

    Step ``i`` is continuous time ``(i + 1)/T`` as in iDDPM and diffusers. ``clip=True`` caps betas at 0.999
    (iDDPM); ``clip=False`` keeps the last ᾱ at exactly 0, i.e. zero terminal SNR (Lin et al. §3.1).
    """
    _check_T(num_train_timesteps)
    times = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    f = torch.cos((times + s) / (1 + s) * math.pi / 2) ** 2
    f[-1] = 0.0  # cos(π/2) is 0; float64 leaves ~3.7e-33
    betas = 1 - f[1:] / f[:-1]
    if not clip:
        return from_betas(betas)  # no diffusers name: squaredcos_cap_v2 is the clipped one
    return from_betas(betas.clamp(max=0.999), Origin("cosine", num_train_timesteps))


def rescale_zero_terminal_snr(schedule: Schedule) -> Schedule:
    """Lin et al. 2024, Algorithm 1: shift and scale ``sqrt(ᾱ)`` so ᾱ_{T-1} = 0 and ᾱ_0 is unchanged."""
    root = schedule.alphas_cumprod.sqrt()
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    origin = schedule.origin
    if origin is not None and not origin.zero_terminal_snr:
        origin = replace(origin, zero_terminal_snr=True)
    return Schedule(root**2, origin)


def shift_resolution(schedule: Schedule, base: int, resolution: int) -> Schedule:
    """Resolution shift (Hoogeboom et al. 2023): ``log SNR_d(t) = log SNR_b(t) + 2 log(b / d)``."""
    if base <= 0 or resolution <= 0:
        raise ValueError(f"base and resolution must be positive, got {base} and {resolution}")
    shifted = schedule.log_snr + 2 * math.log(base / resolution)
    return Schedule(torch.sigmoid(shifted))


def by_name(name: str, num_train_timesteps: int = 1000, *, zero_terminal_snr: bool = False) -> Schedule:
    """A schedule by name, with its builder's default betas."""
    return from_origin(Origin(name, num_train_timesteps, zero_terminal_snr=zero_terminal_snr))


def from_origin(origin: Origin) -> Schedule:
    """The schedule an :class:`Origin` names; betas left ``None`` take the builder's defaults."""
    betas = {k: v for k, v in (("beta_start", origin.beta_start), ("beta_end", origin.beta_end)) if v is not None}
    if origin.name == "rectified_flow":
        return rectified_flow(1.0 if origin.shift is None else origin.shift, origin.num_train_timesteps)
    if origin.name == "cosine":
        schedule = cosine(origin.num_train_timesteps)
    elif origin.name in ("linear", "scaled_linear"):
        schedule = (linear if origin.name == "linear" else scaled_linear)(origin.num_train_timesteps, **betas)
    else:
        raise ValueError(f"unknown schedule {origin.name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    return rescale_zero_terminal_snr(schedule) if origin.zero_terminal_snr else schedule


def _check_T(num_train_timesteps: int) -> None:
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
