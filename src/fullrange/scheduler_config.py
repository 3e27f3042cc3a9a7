"""diffusers scheduler configs ↔ :class:`~fullrange.sampling.SamplingSpec`: the one place the two meet.

A config names its schedule (``beta_schedule``, betas, ``num_train_timesteps``, ``rescale_betas_zero_snr``), the
model's ``prediction_type`` and the step spacing (``timestep_spacing``, ``steps_offset``); a spec holds the
schedule itself. Values a config leaves out take diffusers' defaults.
"""

from __future__ import annotations

from .sampling import SamplingSpec
from .schedules import Origin, from_origin

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
"""diffusers' ``beta_schedule`` names and fullrange's schedule for each."""
DIFFUSERS_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
"""What diffusers' schedulers take for a key their config leaves out."""


def spec_from_config(config: dict) -> SamplingSpec:
    """The sampling spec a diffusers scheduler config describes."""
    c = DIFFUSERS_DEFAULTS | {k: v for k, v in config.items() if v is not None}
    if config.get("trained_betas") is not None:
        raise ValueError("scheduler config: trained_betas are not supported; name a beta_schedule")
    if c["beta_schedule"] not in BETA_SCHEDULES:
        raise ValueError(
            f"scheduler config: beta_schedule {c['beta_schedule']!r} is not supported; "
            f"choose one of {', '.join(BETA_SCHEDULES)}"
        )
    name = BETA_SCHEDULES[c["beta_schedule"]]
    betas = (None, None) if name == "cosine" else (float(c["beta_start"]), float(c["beta_end"]))
    origin = Origin(name, int(c["num_train_timesteps"]), *betas, zero_terminal_snr=bool(c["rescale_betas_zero_snr"]))
    try:
        return SamplingSpec(from_origin(origin), c["prediction_type"], c["timestep_spacing"], int(c["steps_offset"]))
    except ValueError as err:
        raise ValueError(f"scheduler config: {err}") from None


def config_from_spec(spec: SamplingSpec) -> dict:
    """A ``DDIMScheduler`` config that samples as ``spec`` says, in diffusers and in any tool that reads these
    keys. ``set_alpha_to_one`` makes diffusers' last DDIM step return x0, as fullrange's samplers do."""
    origin = spec.schedule.origin
    if origin is None:
        raise ValueError("this schedule was not built by name (linear, scaled_linear, cosine): no config names it")
    config = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": origin.num_train_timesteps,
        "beta_schedule": next(k for k, v in BETA_SCHEDULES.items() if v == origin.name),
        "rescale_betas_zero_snr": origin.zero_terminal_snr,
        "prediction_type": spec.prediction,
        "timestep_spacing": spec.spacing,
        "steps_offset": spec.steps_offset,
        "clip_sample": False,
        "set_alpha_to_one": True,
    }
    if origin.beta_start is not None:
        config |= {"beta_start": origin.beta_start, "beta_end": origin.beta_end}
    return config


def ddim_scheduler(spec: SamplingSpec):
    """diffusers' ``DDIMScheduler`` configured by :func:`config_from_spec` (to save with a pipeline)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config_from_spec(spec))
