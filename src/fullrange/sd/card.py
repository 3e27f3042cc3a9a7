"""The model card a fine-tune leaves in its output folder (``README.md``): what was trained, and how the result must
be sampled, in diffusers', ComfyUI's and A1111's terms."""

from __future__ import annotations

from pathlib import Path

from ..adapters import ADAPTERS
from ..files import write_bytes
from ..sampling import SamplingSpec
from .config import FinetuneConfig
from .model import StableDiffusion


def write_model_card(
    path: Path, config: FinetuneConfig, base: StableDiffusion, spec: SamplingSpec, outputs: dict[str, Path]
) -> Path:
    """``README.md`` for the run's outputs: base, recipe, training settings, files, and sampling instructions."""
    out = path.parent
    v = spec.prediction == "v_prediction"
    ztsnr = spec.schedule.zero_terminal_snr
    a, t = config.adapter, config.train
    noise = config.noise
    fixes = [
        f"offset noise {noise.offset}" if noise.offset else "",
        f"pyramid noise {noise.pyramid}" if noise.pyramid else "",
        f"input perturbation {noise.input_perturbation}" if noise.input_perturbation else "",
        "zero terminal SNR" if ztsnr else "",
        f"min-SNR-γ {noise.min_snr_gamma}" if noise.min_snr_gamma else "",
    ]
    files = "\n".join(
        f"- `{Path(p).relative_to(out) if Path(p).is_relative_to(out) else p}`: {kind}" for kind, p in outputs.items()
    )
    adapter = outputs.get(a.kind)
    pipeline = "StableDiffusionXLPipeline" if base.is_xl else "StableDiffusionPipeline"
    lines = [
        f"# {out.resolve().name}",
        "",
        f"Fine-tuned with fullrange from `{base.source}` ({'SDXL' if base.is_xl else 'Stable Diffusion'}): "
        f"{ADAPTERS[a.kind].describe(a)}{' and the text encoders' if a.text_encoder else ''}, {t.steps} steps at "
        f"{config.data.resolution} px, batch {t.batch_size}×{t.grad_accum}, {t.optimizer} at {t.lr:g} "
        f"({t.lr_schedule} after {t.warmup_steps} warm-up steps), seed {t.seed}.",
        "",
        f"Recipe: predicts **{spec.prediction}**"
        + (", **zero terminal SNR**" if ztsnr else "")
        + "".join(f", {f}" for f in fixes if f and f != "zero terminal SNR")
        + f". The base predicts {base.spec.prediction}"
        + (" with zero terminal SNR." if base.spec.schedule.zero_terminal_snr else "."),
        "",
        "## Files",
        "",
        files,
        "",
        "## How to sample it",
        "",
        f"It must be sampled as a **{'v-prediction' if v else spec.prediction}** model"
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
        "**fullrange**: it reads the settings from the adapter folder.",
        "",
        "```bash",
        (
            f"fullrange sample --model {base.source} --adapter {adapter}"
            if adapter
            else f"fullrange sample --model {outputs['pipeline']}"
        )
        + ' --prompt "..." --out samples'
        + (" --guidance-rescale 0.7" if ztsnr else ""),
        "```",
        "",
        "**diffusers**: the scheduler config saved beside the weights says all of it.",
        "",
        "```python",
        f"from diffusers import DDIMScheduler, {pipeline} as Pipeline",
        "",
    ]
    if "pipeline" in outputs:
        lines += [f'pipe = Pipeline.from_pretrained("{outputs["pipeline"]}")  # its scheduler config is already right']
    else:
        lines += [
            f'pipe = Pipeline.from_pretrained("{base.source}")'
            if base.source.is_dir()
            else f'pipe = Pipeline.from_single_file("{base.source}")',
            f'pipe.load_lora_weights("{adapter}")' if "lora" in outputs else "# OFT: use the merged pipeline",
            f'pipe.scheduler = DDIMScheduler.from_pretrained("{adapter}")',
        ]
    lines += [
        f'image = pipe("...", guidance_rescale={0.7 if ztsnr else 0.0}).images[0]',
        "```",
        "",
        "**ComfyUI**: "
        + (
            f"put `{outputs['kohya'].name}` in `models/loras` and load it with *LoraLoader* on the base; "
            if "kohya" in outputs
            else ""
        )
        + f"add *ModelSamplingDiscrete* with sampling `{'v_prediction' if v else 'eps'}` and zsnr "
        f"`{'true' if ztsnr else 'false'}`" + (", and *RescaleCFG* with multiplier 0.7." if ztsnr else "."),
        "",
        "**A1111**: "
        + (f"put `{outputs['kohya'].name}` in `models/Lora`. " if "kohya" in outputs else "")
        + (
            "In Settings → Sampler parameters set *Noise schedule for sampling* to *Zero Terminal SNR*. "
            if ztsnr
            else ""
        )
        + (
            "A v-prediction SD 1.x / 2.x checkpoint needs a config `.yaml` of the same name with "
            '`parameterization: "v"`; a LoRA cannot change the base\'s prediction type there, so export the '
            "merged model (`fullrange export --model BASE --adapter ADAPTER --out model.safetensors`). "
            if v and base.spec.prediction != "v_prediction"
            else ""
        )
        + "These ComfyUI and A1111 settings are written from their documentation, not tested by fullrange.",
        "",
    ]
    write_bytes(path, "\n".join(lines).encode())
    return path
