"""How other tools read a checkpoint, and the settings that make them sample it as it must be sampled
(``fullrange inspect --for TOOL``). What each tool reads was measured with its own code in ``tests/test_interop.py``
(ComfyUI, A1111's config picker, Forge's detector); lines about what was not measured say so."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .inspection import Inspection

TOOLS = {"comfyui": "ComfyUI", "a1111": "A1111", "forge": "Forge", "diffusers": "diffusers", "invokeai": "InvokeAI"}
"""The tools ``--for`` knows, by the name it takes and the name the tool goes by."""

COMFYUI_ZSNR_SIGMA_MAX = 4518.8
"""ComfyUI's zero-SNR ladder tops out here: it sets ᾱ_T to 4.9e-8, not 0 (σ = ∞), so its first step is close to
fullrange's exact first step from pure noise, not equal (measured: ``model_sampling.sigma_max``)."""
SD_SIGMA_MAX = 14.6
"""σ at t = T-1 of SD's scaled-linear schedule: where a tool that ignores zero terminal SNR starts."""


@dataclass(frozen=True)
class ToolSettings:
    """For one tool: the ``settings`` to enter, as lines, and ``warnings`` where it would read the file wrongly."""

    tool: str
    settings: tuple[str, ...]
    warnings: tuple[str, ...]


def settings_for(tool: str, found: Inspection, path: Path | str) -> ToolSettings:
    """What ``tool`` needs to sample the checkpoint at ``path`` that ``found`` describes."""
    path = Path(path)
    single = path.is_file() and path.suffix == ".safetensors"
    v, ztsnr = found.prediction == "v_prediction", found.zero_terminal_snr
    marked = {m.key for m in found.found if m.convention == "comfyui" and Path(m.source) == path}
    if found.prediction == "flow":
        settings, warnings = _flow(tool, found.scheduler_config.get("shift", 1.0))
        return ToolSettings(tool, tuple(settings), tuple(warnings))
    settings, warnings = {
        "comfyui": _comfyui,
        "a1111": _a1111,
        "forge": _forge,
        "diffusers": _diffusers,
        "invokeai": _invokeai,
    }[tool](found, path, v, ztsnr, single, marked)
    if not single and tool != "diffusers":
        command = f"fullrange export --model {path} --out NAME.safetensors"
        warnings.insert(0, f"{TOOLS[tool]} loads single files: write one with `{command}`")
    return ToolSettings(tool, tuple(settings), tuple(warnings))


def _flow(tool: str, shift: float) -> tuple[list[str], list[str]]:
    """A UNet trained as rectified flow (SD's architecture, the flow interpolant at t = 1000 tau, velocity out)."""
    if tool == "comfyui":
        settings = [
            f"ModelSamplingSD3: shift = {shift:g} (flow sampling of this UNet: input the interpolant, t = 1000 tau)",
            "KSampler: sampler_name = euler, scheduler = simple, denoise = 1",
        ]
        warnings = [
            "no marker tells ComfyUI that an SD / SDXL UNet is a flow model: without ModelSamplingSD3 it "
            "samples it as epsilon"
        ]
    elif tool == "diffusers":
        settings = [
            f"pipe.scheduler = FullrangeScheduler.from_config({{'_class_name': 'FlowMatchEulerDiscreteScheduler', "
            f"'shift': {shift:g}}}) (fullrange.diffusers: SD pipelines call scale_model_input, which diffusers' "
            "FlowMatchEulerDiscreteScheduler lacks)",
        ]
        warnings = []
    else:
        settings = []
        warnings = [f"{TOOLS[tool]} has no flow sampling for SD / SDXL UNets known to fullrange (not checked here)"]
    return settings, warnings


def _comfyui(found, path, v, ztsnr, single, marked):
    sampling = "v_prediction" if v else "eps"
    settings = [f"CheckpointLoaderSimple: ckpt_name = {path.name if single else 'NAME.safetensors'}"]
    settings.append(f"ModelSamplingDiscrete: sampling = {sampling}, zsnr = {str(ztsnr).lower()}")
    if ztsnr:
        settings.append("RescaleCFG: multiplier = 0.7")
    settings.append("KSampler: sampler_name = dpmpp_2m, scheduler = simple (it starts at the top), denoise = 1")
    workflow = path.with_suffix(".comfyui.json")
    if single and workflow.is_file():
        settings.append(f"or load the workflow beside the file: {workflow.name}")
    warnings = []
    # ComfyUI reads the marker tensors of SDXL single files only (measured with its detection code).
    reads = found.family == "sdxl" and single
    reads_right = reads and v == ("v_pred" in marked) and ztsnr == ("ztsnr" in marked)
    if (v or ztsnr) and not reads_right:
        read = "only in SDXL single files" if not reads else "from marker tensors this file does not have"
        warnings.append(
            f"ComfyUI reads v_pred / ztsnr {read}: without ModelSamplingDiscrete it samples this model as epsilon "
            f"on SD's ladder (σ_max {SD_SIGMA_MAX})"
        )
    elif v or ztsnr:
        settings[1] += " (optional: ComfyUI reads this file's v_pred / ztsnr markers)"
    if ztsnr:
        warnings.append(
            f"ComfyUI's zero-SNR ladder stops at σ ≈ {COMFYUI_ZSNR_SIGMA_MAX} instead of σ = ∞: its first step is "
            "close to fullrange's exact one, not equal (fullrange's Sigmas node gives the exact ladder)"
        )
    return settings, warnings


def _a1111(found, path, v, ztsnr, single, marked):
    settings = ["Sampler: DPM++ 2M, Schedule type: Automatic, Steps: 25"]
    warnings = []
    config = path.with_suffix(".yaml")
    if v and found.family in ("sd1", "sd2"):
        if single and config.is_file():
            settings.insert(0, f"keep {config.name} beside the checkpoint: A1111 reads the prediction type from it")
        else:
            warnings.append(
                "A1111 takes an SD 1.x / 2.x model's prediction type only from a same-name .yaml (its config "
                "picker reads no marker): `fullrange export` writes one"
            )
    elif v:
        warnings.append(
            "A1111's config picker reads no marker and builds SDXL as epsilon (sd_xl_base.yaml) unless a same-name "
            ".yaml says otherwise; fullrange writes none for SDXL"
        )
    if ztsnr:
        settings.append("Settings → Sampler parameters → Noise schedule for sampling: Zero Terminal SNR (not run here)")
        settings.append("CFG rescale 0.7 needs an extension (A1111 has none built in; not run here)")
    return settings, warnings


def _forge(found, path, v, ztsnr, single, marked):
    settings, warnings = _a1111(found, path, v, ztsnr, single, marked)
    warnings = [w for w in warnings if "config picker" not in w]
    if v and found.family != "sdxl":
        warnings.append("Forge's detector (huggingface_guess) reads v_pred for SDXL only: this file loads as epsilon")
    elif v and "v_pred" not in marked:
        warnings.append("Forge's detector reads v-prediction from the v_pred marker tensor, which this file lacks")
    if ztsnr:
        warnings.append("whether Forge applies the ztsnr marker was not checked here: set zero terminal SNR by hand")
    return settings, warnings


def _diffusers(found, path, v, ztsnr, single, marked):
    keys = ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing")
    given = ", ".join(f"{k}={found.scheduler_config[k]!r}" for k in keys if k in found.scheduler_config)
    settings = [
        f"pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, {given})",
        f"pipe(prompt, guidance_rescale={0.7 if ztsnr else 0.0})",
        "or FullrangeScheduler.from_config(...), exact at SNR = 0 (fullrange.diffusers)",
    ]
    warnings = []
    if single and (v or ztsnr):
        warnings.append("from_single_file reads neither v_pred nor ztsnr (its loader never looks): set the scheduler")
    return settings, warnings


def _invokeai(found, path, v, ztsnr, single, marked):
    settings = [f"Model Manager → the model → Prediction type: {'v_prediction' if v else 'epsilon'}"]
    warnings = ["InvokeAI was not run here: these settings are from its documentation, not measured"]
    if ztsnr:
        warnings.append("InvokeAI has no zero-terminal-SNR setting known to fullrange: its first step will leak")
    return settings, warnings
