"""What a checkpoint says about how it must be sampled: its prediction type and zero terminal SNR, written four ways.

- ``diffusers``: the scheduler config's ``prediction_type`` and ``rescale_betas_zero_snr``, or a flow-matching config
  (rectified flow: flow prediction, SNR = 0 at t = T);
- ``comfyui``: empty ``v_pred`` / ``ztsnr`` tensors in a single file (their presence is the marker);
- ``kohya``: ``ss_v_parameterization`` / ``ss_zero_terminal_snr`` in the safetensors metadata;
- ``modelspec``: ``modelspec.prediction_type`` in the safetensors metadata (``epsilon`` or ``v``).

Each tool reads a different subset; :func:`decide` reads them all and says where they disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..scheduler_config import is_flow_config

PRECEDENCE = ("diffusers", "comfyui", "kohya", "modelspec")
"""Which convention wins a disagreement: the most explicit first (a config, then marker tensors, then metadata)."""
PREDICTIONS = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
PREDICTIONS |= {"sample": "sample", "x0": "sample", "flow": "flow", "flow_prediction": "flow"}


@dataclass(frozen=True)
class Marker:
    """One statement found in ``source``: ``key`` = ``value`` in ``convention``, meaning a ``prediction`` type or
    a ``zero_terminal_snr`` setting (``None``: says nothing about it)."""

    source: str
    convention: str
    key: str
    value: str
    prediction: str | None = None
    zero_terminal_snr: bool | None = None


@dataclass(frozen=True)
class Decision:
    """What the markers say, taken by :data:`PRECEDENCE`: ``None`` where none speaks. ``conflicts`` lists each
    disagreement in words."""

    prediction: str | None
    zero_terminal_snr: bool | None
    conflicts: tuple[str, ...]


def _truthy(value: object) -> bool | None:
    text = str(value).strip().lower()
    return True if text in ("true", "1", "yes") else False if text in ("false", "0", "no", "none", "") else None


def from_header(header: dict, source: str) -> list[Marker]:
    """The markers of a safetensors header (tensor names and ``__metadata__``)."""
    meta = header.get("__metadata__") or {}
    found = []
    if "v_pred" in header:
        found.append(Marker(source, "comfyui", "v_pred", "tensor present", prediction="v_prediction"))
    if "ztsnr" in header:
        found.append(Marker(source, "comfyui", "ztsnr", "tensor present", zero_terminal_snr=True))
    if "ss_v_parameterization" in meta:
        value = meta["ss_v_parameterization"]
        flag = _truthy(value)
        prediction = None if flag is None else ("v_prediction" if flag else "epsilon")
        found.append(Marker(source, "kohya", "ss_v_parameterization", value, prediction=prediction))
    if "ss_zero_terminal_snr" in meta:
        value = meta["ss_zero_terminal_snr"]
        found.append(Marker(source, "kohya", "ss_zero_terminal_snr", value, zero_terminal_snr=_truthy(value)))
    if "modelspec.prediction_type" in meta:
        value = meta["modelspec.prediction_type"]
        prediction = PREDICTIONS.get(str(value).strip().lower())
        found.append(Marker(source, "modelspec", "modelspec.prediction_type", value, prediction=prediction))
    return found


def from_config(config: dict, source: str) -> list[Marker]:
    """The markers of a diffusers scheduler config (only the keys it sets)."""
    if is_flow_config(config):
        key = "_class_name" if "_class_name" in config else "use_dynamic_shifting"
        return [Marker(source, "diffusers", key, str(config.get(key)), prediction="flow", zero_terminal_snr=True)]
    found = []
    if config.get("prediction_type") is not None:
        value = config["prediction_type"]
        found.append(Marker(source, "diffusers", "prediction_type", value, prediction=PREDICTIONS.get(str(value))))
    if config.get("rescale_betas_zero_snr") is not None:
        value = config["rescale_betas_zero_snr"]
        found.append(Marker(source, "diffusers", "rescale_betas_zero_snr", str(value), zero_terminal_snr=bool(value)))
    return found


def decide(markers: list[Marker]) -> Decision:
    """The prediction type and zero terminal SNR the markers state, by :data:`PRECEDENCE`; disagreements listed."""
    ranked = sorted(markers, key=lambda m: PRECEDENCE.index(m.convention))
    conflicts = []
    chosen = {}
    for field in ("prediction", "zero_terminal_snr"):
        said = [m for m in ranked if getattr(m, field) is not None]
        values = {getattr(m, field) for m in said}
        chosen[field] = getattr(said[0], field) if said else None
        if len(values) > 1:
            claims = "; ".join(f"{m.convention} {m.key} = {m.value} ({Path(m.source).name})" for m in said)
            conflicts.append(f"{field.replace('_', ' ')}: {claims}")
    return Decision(chosen["prediction"], chosen["zero_terminal_snr"], tuple(conflicts))


KOHYA_BASE_MODEL = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-512/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
}


def adapter_metadata(spec, base, family: str, title: str) -> dict[str, str]:
    """kohya's ``ss_*`` and ``modelspec.*`` keys for an adapter trained as ``spec`` on a ``base`` (sampling specs) of
    ``family``, and a description when the adapter changes the base's prediction type or terminal SNR."""
    if spec.prediction == "flow":
        raise ValueError("adapter exports of flow models are not built (no tool reads a flow adapter's markers)")
    v = spec.prediction == "v_prediction"
    ztsnr = spec.schedule.zero_terminal_snr
    meta = {
        "ss_base_model_version": KOHYA_BASE_MODEL[family],
        "ss_v2": str(family == "sd2"),
        "ss_v_parameterization": str(v),
        "ss_zero_terminal_snr": str(ztsnr),  # fullrange's; kohya has no key for it
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[family],
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.prediction_type": "v" if v else "epsilon",
    }
    if spec.prediction != base.prediction or ztsnr != base.schedule.zero_terminal_snr:
        meta["modelspec.description"] = (
            f"Trained as {spec.prediction}{' with zero terminal SNR' if ztsnr else ''} on a {base.prediction} "
            "base: sample it at strength 1 with those settings; a lower strength or another adapter on top mixes "
            "two prediction types and has no meaning."
        )
    return meta
