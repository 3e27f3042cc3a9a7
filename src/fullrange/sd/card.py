"""The model card a fine-tune leaves in its output folder (``README.md``): YAML front-matter for the Hugging Face Hub,
what was trained, and how the result must be sampled, in fullrange's, diffusers', ComfyUI's and A1111's terms.

Paths are quoted for the language they are pasted into (shell words, Python strings): a path is data, never code.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from ..adapters import ADAPTERS
from ..files import write_bytes
from ..sampling import SamplingSpec
from .config import FinetuneConfig
from .model import StableDiffusion


def write_model_card(
    path: Path,
    config: FinetuneConfig,
    base: StableDiffusion,
    spec: SamplingSpec,
    outputs: dict[str, Path],
    *,
    processes: int = 1,
    validation: Path | None = None,
) -> Path:
    """``README.md`` for the run's outputs: front-matter, base, recipe, training settings (the global batch: per
    process × ``processes`` × accumulation), files, the last ``validation`` grid if any, and how to sample it."""
    out = path.parent
    sections = [
        _front_matter(config, base, spec),
        _trained(config, base, spec, out, processes),
        _files(outputs, out, validation),
        _sampling(config, base, spec, outputs),
    ]
    write_bytes(path, "\n".join(line for section in sections for line in section).encode())
    return path


def _front_matter(config: FinetuneConfig, base: StableDiffusion, spec: SamplingSpec) -> list[str]:
    tags = ["fullrange", "stable-diffusion", "text-to-image", config.adapter.kind]
    tags += ["v-prediction"] if spec.prediction == "v_prediction" else []
    tags += ["zero-terminal-snr"] if spec.schedule.zero_terminal_snr else []
    return [
        "---",
        f"base_model: {json.dumps(str(base.source))}",
        "library_name: diffusers",
        "tags:",
        *(f"- {tag}" for tag in tags),
        "---",
        "",
    ]


def _trained(config: FinetuneConfig, base: StableDiffusion, spec: SamplingSpec, out: Path, processes: int) -> list[str]:
    a, t, noise = config.adapter, config.train, config.noise
    fixes = [
        f"offset noise {noise.offset}" if noise.offset else "",
        f"pyramid noise {noise.pyramid}" if noise.pyramid else "",
        f"input perturbation {noise.input_perturbation}" if noise.input_perturbation else "",
        f"min-SNR-γ {noise.min_snr_gamma}" if noise.min_snr_gamma else "",
    ]
    batch = t.batch_size * processes * t.grad_accum
    per = f" ({t.batch_size} per process × {processes} processes × {t.grad_accum} accumulated)"
    return [
        f"# {out.resolve().name}",
        "",
        f"Fine-tuned with fullrange from `{base.source}` ({'SDXL' if base.is_xl else 'Stable Diffusion'}): "
        f"{ADAPTERS[a.kind].describe(a)}{' and the text encoders' if a.text_encoder else ''}, {t.steps} steps at "
        f"{config.data.resolution} px, batch {batch}{per if batch != t.batch_size else ''}, {t.optimizer} at "
        f"{t.lr:g} ({t.lr_schedule} after {t.warmup_steps} warm-up steps), seed {t.seed}.",
        "",
        f"Recipe: predicts **{spec.prediction}**"
        + (", **zero terminal SNR**" if spec.schedule.zero_terminal_snr else "")
        + "".join(f", {f}" for f in fixes if f)
        + f". The base predicts {base.spec.prediction}"
        + (" with zero terminal SNR." if base.spec.schedule.zero_terminal_snr else "."),
        "",
    ]


def _files(outputs: dict[str, Path], out: Path, validation: Path | None) -> list[str]:
    def shown(path: Path) -> str:
        return str(Path(path).relative_to(out) if Path(path).is_relative_to(out) else path)

    lines = ["## Files", "", *(f"- `{shown(p)}`: {kind}" for kind, p in outputs.items()), ""]
    if validation is not None:
        lines += ["The validation prompts at the last checkpoint:", "", f"![validation]({shown(validation)})", ""]
    return lines


def _flow_sampling(base: StableDiffusion, spec: SamplingSpec, outputs: dict[str, Path]) -> list[str]:
    """How a model turned into flow is sampled: rectified flow by fullrange, diffusers (through fullrange's
    scheduler) and ComfyUI; flow on SD's own timesteps (the aligned conversion) by fullrange alone."""
    adapter = next((outputs[k] for k in ("lora", "oft") if k in outputs), None)
    model = (
        f"--model {shlex.quote(str(base.source))} --adapter {shlex.quote(str(adapter))}"
        if adapter
        else (f"--model {shlex.quote(str(outputs['pipeline']))}")
    )
    command = ["```bash", f'fullrange sample {model} --prompt "..." --out samples', "```", ""]
    if spec.schedule.coordinates != "flow":
        return [
            "## How to sample it",
            "",
            "It predicts the flow velocity on the base's own timesteps (the aligned "
            "conversion): only fullrange samples it.",
            "",
            *command,
        ]
    shift = f"{spec.schedule.shift:g}"
    pipeline = "StableDiffusionXLPipeline" if base.is_xl else "StableDiffusionPipeline"
    return [
        "## How to sample it",
        "",
        f"It must be sampled as a **rectified-flow** model with time shift **{shift}**: it sees the flow interpolant "
        "(1 − τ) x0 + τ ε at timestep 1000 τ and predicts the velocity ε − x0.",
        "",
        "**fullrange**: it reads that from the " + ("adapter folder." if adapter else "pipeline."),
        "",
        *command,
        "**diffusers**: through fullrange's scheduler (SD pipelines call `scale_model_input`, which diffusers' "
        "`FlowMatchEulerDiscreteScheduler` lacks).",
        "",
        "```python",
        f"from diffusers import {pipeline} as Pipeline",
        "from fullrange.diffusers import FullrangeScheduler",
        "",
        f"pipe = Pipeline.from_pretrained({_py(outputs.get('pipeline', base.source))})",
        "pipe.scheduler = FullrangeScheduler.from_config(pipe.scheduler.config)  # flow-matching, shift " + shift,
        'image = pipe("...").images[0]',
        "```",
        "",
        f"**ComfyUI**: load a single file (`fullrange export`, which writes the workflow beside it); add "
        f"*ModelSamplingSD3* with shift {shift}, and sample with euler and the simple scheduler.",
        "",
        "**A1111 / Forge**: no flow sampling for SD / SDXL UNets is known to fullrange.",
        "",
    ]


def _sampling(config: FinetuneConfig, base: StableDiffusion, spec: SamplingSpec, outputs: dict[str, Path]) -> list:
    if spec.prediction == "flow":
        return _flow_sampling(base, spec, outputs)
    v = spec.prediction == "v_prediction"
    ztsnr = spec.schedule.zero_terminal_snr
    adapter = outputs.get(config.adapter.kind)  # a LoRA or OFT folder; a full fine-tune has none
    kind = "v-prediction" if v else spec.prediction
    lines = [
        "## How to sample it",
        "",
        f"It must be sampled as {'an' if kind[0] in 'aeiou' else 'a'} **{kind}** model"
        + (
            ", with the schedule rescaled to **zero terminal SNR** and the first step at t = T−1 (trailing or "
            "linspace spacing, not leading); rescale the guidance (φ = 0.7) against over-exposure."
            if ztsnr
            else "."
        )
        + (
            " A LoRA that changed the prediction type means this only at strength 1 (at 0 it is the base)."
            if "lora" in outputs and spec.prediction != base.spec.prediction
            else ""
        ),
        "",
        "**fullrange**: "
        + ("it reads the settings from the adapter folder." if adapter else "it reads them from the pipeline."),
        "",
        "```bash",
        (
            f"fullrange sample --model {shlex.quote(str(base.source))} --adapter {shlex.quote(str(adapter))}"
            if adapter
            else f"fullrange sample --model {shlex.quote(str(outputs['pipeline']))}"
        )
        + ' --prompt "..." --out samples'
        + (" --guidance-rescale 0.7" if ztsnr else ""),
        "```",
        "",
        *_diffusers(base, outputs, adapter, ztsnr),
        *_tools(base, spec, outputs),
    ]
    return lines


def _diffusers(base: StableDiffusion, outputs: dict[str, Path], adapter: Path | None, ztsnr: bool) -> list[str]:
    pipeline = "StableDiffusionXLPipeline" if base.is_xl else "StableDiffusionPipeline"
    lines = [
        "**diffusers**: the scheduler config saved beside the weights says all of it.",
        "",
        "```python",
        f"from diffusers import DDIMScheduler, {pipeline} as Pipeline",
        "",
    ]
    if "pipeline" in outputs:
        lines += [f"pipe = Pipeline.from_pretrained({_py(outputs['pipeline'])})  # its scheduler config is right"]
    else:
        load = "from_pretrained" if base.source.is_dir() else "from_single_file"
        lines += [
            f"pipe = Pipeline.{load}({_py(base.source)})",
            f"pipe.load_lora_weights({_py(adapter)})",
            f"pipe.scheduler = DDIMScheduler.from_pretrained({_py(adapter)})",
        ]
    return [*lines, f'image = pipe("...", guidance_rescale={0.7 if ztsnr else 0.0}).images[0]', "```", ""]


def _tools(base: StableDiffusion, spec: SamplingSpec, outputs: dict[str, Path]) -> list[str]:
    v, ztsnr = spec.prediction == "v_prediction", spec.schedule.zero_terminal_snr
    kohya = outputs.get("kohya")
    single = (
        "a single file (`fullrange export --model ... --out model.safetensors`, which writes beside it the ComfyUI "
        "workflow and, for a v-prediction SD 1.x / 2.x model, the A1111 `.yaml` described here)"
    )
    comfy = (
        f"put `{kohya.name}` in `models/loras` and load it with *LoraLoader* on the base; "
        if kohya
        else f"load {single}; "
    )
    a1111 = f"put `{kohya.name}` in `models/Lora`. " if kohya else f"load {single}. "
    if ztsnr:
        a1111 += "In Settings → Sampler parameters set *Noise schedule for sampling* to *Zero Terminal SNR*. "
    if v and not base.is_xl:
        a1111 += (
            "A v-prediction SD 1.x / 2.x checkpoint needs a config `.yaml` of the same name with "
            '`parameterization: "v"` (`fullrange export` writes it)'
            + (
                "; a LoRA cannot change the base's prediction type there, so export the merged model. "
                if kohya
                else ". "
            )
        )
    return [
        "**ComfyUI**: "
        + comfy
        + f"add *ModelSamplingDiscrete* with sampling `{'v_prediction' if v else 'eps'}` and zsnr "
        f"`{'true' if ztsnr else 'false'}`" + (", and *RescaleCFG* with multiplier 0.7." if ztsnr else "."),
        "",
        ("**A1111**: " + a1111).rstrip(),
        "",
        "`fullrange inspect FILE --for comfyui` (or `a1111`, `forge`, `diffusers`, `invokeai`) prints the settings "
        "per tool, with a warning where the tool reads the file wrongly.",
        "",
    ]


def _py(path: Path | str) -> str:
    """A Python string literal of ``path`` (quotes and backslashes escaped)."""
    return json.dumps(str(path))
