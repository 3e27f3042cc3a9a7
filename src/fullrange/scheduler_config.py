"""diffusers scheduler configs ↔ :class:`~fullrange.sampling.SamplingSpec`: the one place the two meet.

A config names its schedule (``beta_schedule``, betas, ``num_train_timesteps``, ``rescale_betas_zero_snr``), the
model's ``prediction_type`` and the step spacing (``timestep_spacing``, ``steps_offset``); a spec holds the
schedule itself. Values a config leaves out take diffusers' defaults. Flow-matching configs (SD3, Flux:
``FlowMatchEulerDiscreteScheduler``; SANA-style ``use_flow_sigmas``) describe rectified flow with a time shift.
"""

from __future__ import annotations

import math

from .sampling import SamplingSpec
from .schedules import Origin, check_shift, from_origin, rectified_flow

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


FLOW_DEFAULTS = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}
"""What ``FlowMatchEulerDiscreteScheduler`` takes for a key its config leaves out."""
FLOW_UNSUPPORTED = ("shift_terminal", "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
"""Flow-matching config keys fullrange does not follow; set, they are refused rather than ignored."""


def is_flow_config(config: dict) -> bool:
    """Whether a scheduler config describes rectified flow: a flow-matching scheduler's (by its class name, or where
    the name is not saved by a ``use_dynamic_shifting`` key without betas), or any with ``use_flow_sigmas``."""
    unnamed = "use_dynamic_shifting" in config and "beta_schedule" not in config
    flow_matching = str(config.get("_class_name", "")).startswith("FlowMatch") or unnamed
    return flow_matching or bool(config.get("use_flow_sigmas"))


def flow_shift_from_config(config: dict, mu: float | None = None) -> float:
    """The time shift a flow-matching config samples with: its ``shift``, or with ``use_dynamic_shifting`` the one
    Flux's ``mu`` gives (``exp(mu)``, or ``mu`` for ``time_shift_type="linear"``;
    :func:`fullrange.schedules.flux_mu` computes mu from the image size)."""
    c = FLOW_DEFAULTS | {k: v for k, v in config.items() if v is not None}
    if config.get("use_flow_sigmas"):
        return check_shift(float(config.get("flow_shift", 1.0)))
    if not c["use_dynamic_shifting"]:
        return check_shift(float(c["shift"]))
    if mu is None:
        raise ValueError("scheduler config: use_dynamic_shifting shifts per image size; give mu (schedules.flux_mu)")
    return check_shift(float(mu) if c["time_shift_type"] == "linear" else math.exp(mu))


def flow_spec_from_config(config: dict, mu: float | None = None) -> SamplingSpec:
    """The spec of a rectified-flow model from its scheduler config: flow prediction, trailing steps, the config's
    time shift (:func:`flow_shift_from_config`; a dynamic config without ``mu`` holds shift 1 until a pipeline
    passes one, as in :class:`fullrange.diffusers.FullrangeFlowScheduler`)."""
    bad = [k for k in FLOW_UNSUPPORTED if config.get(k)]
    if bad:
        raise ValueError(f"scheduler config: {', '.join(bad)} is not supported for flow models")
    dynamic = bool(config.get("use_dynamic_shifting")) and mu is None
    shift = 1.0 if dynamic else flow_shift_from_config(config, mu)
    T = int(config.get("num_train_timesteps") or FLOW_DEFAULTS["num_train_timesteps"])
    return SamplingSpec(rectified_flow(shift, T), "flow", "trailing")


def spec_from_config(config: dict) -> SamplingSpec:
    """The sampling spec a diffusers scheduler config describes. A flow-matching config with Flux's dynamic shift
    is refused: its shift depends on the image size, which only a pipeline's ``mu`` gives
    (:class:`fullrange.diffusers.FullrangeFlowScheduler` takes it)."""
    if is_flow_config(config):
        if config.get("use_dynamic_shifting") and not config.get("use_flow_sigmas"):
            raise ValueError(
                "scheduler config: use_dynamic_shifting sets the shift per image size; give a static shift "
                "(schedules.flux_shift(seq_len) is Flux's for one size)"
            )
        return flow_spec_from_config(config)
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
    if spec.prediction == "flow" and origin.name != "rectified_flow":
        raise ValueError(
            "flow prediction on a VP timestep table (fullrange's aligned conversion) has no diffusers scheduler "
            "config: fullrange.sample and FullrangeScheduler sample it"
        )
    if origin.name == "rectified_flow":
        return {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": origin.num_train_timesteps,
            "shift": spec.schedule.shift,
        }
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
    """diffusers' scheduler configured by :func:`config_from_spec` (to save with a pipeline): ``DDIMScheduler``, or
    for rectified flow ``FlowMatchEulerDiscreteScheduler`` (its Euler step is DDIM's)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    config = config_from_spec(spec)
    cls = FlowMatchEulerDiscreteScheduler if config["_class_name"].startswith("FlowMatch") else DDIMScheduler
    return cls.from_config(config)
