"""``fullrange inspect``: everything needed to sample a checkpoint right. Its family; its prediction type and zero
terminal SNR read from every convention (:mod:`fullrange.sd.markers`) and, where they are silent or disagree, probed;
the sampler settings to use and a diffusers scheduler config that says the same.

The probe is one UNet call at t = T-1 on seeded noise x with the empty prompt. There x_t is (almost) pure noise, so an
epsilon model returns about x itself, and a v model ``sqrt(ᾱ) eps - sqrt(1 - ᾱ) x0`` about minus its guess of the
image, nearly unrelated to x. The cosine of output and input tells them apart; it cannot tell v from x0 prediction.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..files import read_json
from ..sampling import default_rescale, pick, retrained
from ..scheduler_config import config_from_spec
from . import markers, single_file
from .config import ModelConfig
from .load import load_adapter, load_stable_diffusion
from .model import StableDiffusion

EPSILON_ABOVE = 0.8
"""A cosine above this says epsilon: the exact epsilon at t = T-1 is ``(x - sqrt(ᾱ) x0) / sqrt(1 - ᾱ)``, cosine
about 1 with x."""
V_BELOW = 0.5
"""A cosine below this says v (or x0): the exact v, ``(sqrt(ᾱ) x - x0) / sqrt(1 - ᾱ)``, is dominated by the
image; in between the probe is inconclusive."""


@dataclass(frozen=True)
class Probe:
    cosine: float
    prediction: str | None

    @classmethod
    def of(cls, output: torch.Tensor, noise: torch.Tensor) -> Probe:
        """The verdict on a UNet's ``output`` for the input ``noise`` at t = T-1 (the module docstring)."""
        cosine = float(torch.nn.functional.cosine_similarity(output.flatten(), noise.flatten(), dim=0))
        verdict = "epsilon" if cosine > EPSILON_ABOVE else "v_prediction" if cosine < V_BELOW else None
        return cls(cosine, verdict)

    def describe(self) -> str:
        reading = {
            "epsilon": "the output is the input noise: epsilon",
            "v_prediction": "the output is unrelated to the input noise: v (or x0) prediction",
            None: "inconclusive",
        }[self.prediction]
        return f"cos(output, input) at t = T-1 is {self.cosine:.3f}: {reading}"


@dataclass(frozen=True)
class Inspection:
    """``family``; the ``found`` markers (adapter's first) and their ``decision``; the ``probe`` if run; the
    ``prediction`` and ``zero_terminal_snr`` to sample with and ``how`` each was settled; ``settings`` for
    ``fullrange sample`` and the diffusers ``scheduler_config`` that says the same; ``notes`` in words."""

    family: str
    found: tuple[markers.Marker, ...]
    decision: markers.Decision
    probe: Probe | None
    prediction: str
    zero_terminal_snr: bool
    how: dict[str, str]
    settings: dict
    scheduler_config: dict
    notes: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def read_markers(path: Path | str, problems: list[str] | None = None) -> list[markers.Marker]:
    """The markers of a single file (its header), or of a folder: a diffusers pipeline's scheduler config, an
    adapter folder's ``scheduler_config.json`` and the metadata of its safetensors files. A file that cannot be
    read is skipped, and why is added to ``problems``."""
    path = Path(path)
    problems = [] if problems is None else problems
    headers = [path] if path.is_file() and path.suffix == ".safetensors" else sorted(path.glob("*.safetensors"))
    configs = [] if path.is_file() else [path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"]
    found = []
    for config in (c for c in configs if c.is_file()):
        try:
            values = read_json(config)
            if not isinstance(values, dict):
                raise ValueError(f"{config}: not a JSON object")
            found += markers.from_config(values, str(config))
        except ValueError as err:
            problems.append(f"{err}; its markers are not read")
    for weights in headers:
        try:
            found += markers.from_header(single_file.read_header(weights), str(weights))
        except ValueError as err:
            problems.append(f"{err}; its markers are not read")
    return found


@torch.no_grad()
def probe(model: StableDiffusion, seed: int = 0) -> Probe:
    """One UNet call at t = T-1 on seeded noise with the empty prompt (module docstring)."""
    unet = model.unet
    side = unet.config.sample_size
    x = torch.randn(1, unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(seed))
    pixels = (side * model.vae_scale_factor,) * 2
    time_ids = model.time_ids(pixels, (0, 0), pixels)
    cond = model.condition(model.encode_prompts([""]), None if time_ids is None else time_ids.unsqueeze(0))
    param = next(unet.parameters())
    t = torch.full((1,), float(model.spec.schedule.timesteps[-1]), device=param.device)
    out = unet(x.to(param), t, **cond).sample.float().cpu()
    return Probe.of(out, x)


def inspect(model: ModelConfig | str, adapter: str | None = None, *, always_probe: bool = False) -> Inspection:
    """Inspect the checkpoint a ``[model]`` table (or just a path) names, with ``adapter``, whose markers come first:
    they describe the combined model. The probe runs where the markers say nothing of the prediction type or
    disagree about it, or with ``always_probe``."""
    config = model if isinstance(model, ModelConfig) else ModelConfig(str(model))
    model_path = config.path
    notes: list[str] = []
    base = read_markers(model_path, notes)
    extra = read_markers(adapter, notes) if adapter is not None else []
    found = extra + base
    base_decision, decision = markers.decide(base), markers.decide(extra)
    decision = markers.Decision(
        decision.prediction or base_decision.prediction,
        decision.zero_terminal_snr if decision.zero_terminal_snr is not None else base_decision.zero_terminal_snr,
        decision.conflicts + base_decision.conflicts,
    )
    # Markers that cannot both hold (zero terminal SNR with epsilon, said or defaulted): diagnosed, not refused.
    impossible = bool(base_decision.zero_terminal_snr) and base_decision.prediction in (None, "epsilon")
    if impossible:
        notes.append(
            "the markers say zero terminal SNR with epsilon prediction, which cannot be sampled (at SNR = 0 eps says "
            "nothing about the image): loaded without zero terminal SNR, and the probe decides"
        )
    with warnings.catch_warnings():  # the loader's warning about disagreeing markers: reported below instead
        warnings.simplefilter("ignore")
        model = load_stable_diffusion(config, zero_terminal_snr=False if impossible else None)
    if adapter is not None and Path(adapter).is_dir():
        model = load_adapter(model, adapter)
    always_probe = always_probe or impossible
    if extra and base_decision.prediction and decision.prediction != base_decision.prediction:
        notes.append(
            f"the adapter changes the prediction type from the base's {base_decision.prediction} to "
            f"{decision.prediction}: it cannot be scaled or stacked meaningfully"
        )
    disputed = decision.prediction is None or any(c.startswith("prediction") for c in decision.conflicts)
    result = probe(model) if (disputed or always_probe) else None
    how = {}
    if result is not None and result.prediction is not None:
        prediction, how["prediction"] = result.prediction, "probe"
        if decision.prediction is not None and decision.prediction != result.prediction and not disputed:
            notes.append(f"the markers say {decision.prediction} but the probe says {result.prediction}")
    elif decision.prediction is not None:
        prediction, how["prediction"] = decision.prediction, "markers"
    else:
        prediction, how["prediction"] = model.spec.prediction, "default of the loader (no marker, probe inconclusive)"
    ztsnr = bool(decision.zero_terminal_snr)
    how["zero_terminal_snr"] = "markers" if decision.zero_terminal_snr is not None else "not marked: assumed off"
    if ztsnr and prediction == "epsilon":
        notes.append("zero terminal SNR is marked but the model predicts epsilon, which says nothing at SNR = 0")
        ztsnr = False
    spec = replace(retrained(model.spec, prediction, ztsnr), spacing="trailing", steps_offset=0)
    # What `fullrange sample` picks for this model at its own size, written out.
    sampler, spacing, _ = pick(spec)
    settings = {"sampler": sampler, "steps": 25, "spacing": spacing, "guidance_rescale": default_rescale(spec)}
    if (model.spec.prediction, model.spec.schedule.zero_terminal_snr) != (prediction, ztsnr):
        settings |= {"prediction": prediction, "zero_terminal_snr": ztsnr}
        notes.append(
            f"fullrange loads this checkpoint as {model.spec.prediction}, zero terminal SNR "
            f"{'on' if model.spec.schedule.zero_terminal_snr else 'off'}: sample it with --prediction and "
            "--zero-terminal-snr as below"
        )
    if not ztsnr:
        notes.append(
            "trailing steps start at t = T-1 (Lin et al. §3.3); for images darker or brighter than mid-grey add "
            "--tone (no fine-tuning) or fine-tune with zero terminal SNR"
        )
    return Inspection(
        _family(model_path, model),
        tuple(found),
        decision,
        result,
        prediction,
        ztsnr,
        how,
        settings,
        config_from_spec(spec),
        tuple(notes),
    )


def _family(path: str, model: StableDiffusion) -> str:
    """sd1 / sd2 / sdxl: a single file's from its tensor names, a folder's from its networks."""
    if Path(path).is_file() and Path(path).suffix == ".safetensors":
        return single_file.family(single_file.read_header(path), path)
    try:
        return model.family
    except ValueError:
        return f"unknown (UNet cross-attention width {model.unet.config.cross_attention_dim})"
