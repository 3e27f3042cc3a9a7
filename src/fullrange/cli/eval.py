"""``fullrange eval``: measure models. ``eval brightness``: the brightness range a model reaches."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from ..config import from_dict
from ..sd.sample import TONE_SOURCES, SampleSettings
from ._errors import fail, library_errors, warnings_as_lines
from ._options import (
    MODEL_FLAGS,
    Adapter,
    AllowPickle,
    Model,
    ModelConfigDir,
    NumImages,
    Sha256,
    field_flags,
    load_model,
    tables,
    with_fields,
)

app = typer.Typer(help="Measure models.", no_args_is_help=True, rich_markup_mode=None)
SHAPING = (
    "guidance_interval",
    "guidance_low",
    "apg_eta",
    "apg_norm_threshold",
    "apg_momentum",
    "cfg_zero_star",
    "cfg_zero_init",
    "cfg_pp",
)
SETTINGS = ("sampler", "steps", "guidance", "guidance_rescale", *SHAPING, "seed", "resolution", *TONE_SOURCES)
ERROR_NAMES = MODEL_FLAGS | field_flags(SampleSettings) | {"num_images": "--num-images"}


Out = Annotated[Path, typer.Option(help="Output folder: brightness.json, brightness.png, images per prompt.")]
Against = Annotated[str | None, typer.Option(help="A second model to compare, side by side.")]


def brightness_command(
    model: Model,
    out: Out,
    adapter: Adapter = None,
    against: Against = None,
    num_images: NumImages = 4,
    sha256: Sha256 = None,
    model_config: ModelConfigDir = None,
    allow_pickle: AllowPickle = False,
    **fields,
) -> None:
    """Generate the offset-noise article's dark and bright prompts and report the brightness range reached; with a
    tone, --model is sampled with and without it, on the same prompts and seeds. --model-config, --allow-pickle also
    apply to --against."""
    from ..sd.eval import summarize, write

    if num_images <= 0:
        fail(f"--num-images must be positive, got {num_images}")
    if out.exists() and not out.is_dir():
        fail(f"--out {out}: is a file, not a directory")
    with library_errors(ERROR_NAMES):
        settings = from_dict(SampleSettings, tables(fields))
    results = {}
    models = {"model": (model, sha256, adapter)} | ({"against": (against, None, None)} if against else {})
    for name, (path, checksum, lora) in models.items():
        with library_errors(ERROR_NAMES | ({"model.path": "--against"} if name == "against" else {})):
            sd_model = load_model(path, checksum, model_config, allow_pickle)
            label = Path(path).name + (f" + {lora.name}" if lora else "")
            label = label if label not in results else f"{label} ({name})"
            results |= _evaluate(sd_model, lora, settings, name, label, out, num_images)
    try:
        report = write(results, out)
    except OSError as err:
        fail(f"--out {out}: cannot write ({err.strerror})")
    for label, res in results.items():
        summary = summarize(res)
        typer.echo(
            f"{label}: darkest dark prompt {summary['darkest_dark_prompt']:.3f}, brightest bright prompt "
            f"{summary['brightest_bright_prompt']:.3f}, range {summary['range']:.3f}"
        )
    typer.echo(f"wrote {report} and {out / 'brightness.png'}", err=True)


def _evaluate(model, adapter: Path | None, settings: SampleSettings, name: str, label: str, out: Path, n: int) -> dict:
    """The results of ``model`` (with ``adapter``) by label: with ``settings`` as they are, and for ``--model`` also
    with its tone (:func:`_variants`); images under ``OUT/NAME`` and ``OUT/NAME_tone``."""
    from ..sd import load_adapter
    from ..sd.eval import evaluate

    if adapter is not None:
        model = load_adapter(model, adapter)
    results = {}
    for suffix, variant in _variants(settings, with_tone=name == "model").items():
        with warnings_as_lines():
            results[label + suffix] = evaluate(model, variant, out / (name + ("_tone" if suffix else "")), n)
    return results


def _variants(settings: SampleSettings, with_tone: bool) -> dict[str, SampleSettings]:
    """The settings to sample a model with, by the suffix of their label: without a tone (``""``), and with the tone
    the settings give (named after it) where ``with_tone``."""
    plain = dataclasses.replace(settings, **dict.fromkeys(TONE_SOURCES))
    given = {k: getattr(settings, k) for k in TONE_SOURCES if getattr(settings, k) is not None}
    if not with_tone or not given:
        return {"": plain}
    return {"": plain, " + " + ", ".join(f"{k.replace('_', ' ')} {Path(v).name}" for k, v in given.items()): settings}


app.command("brightness")(with_fields(brightness_command, SampleSettings, only=SETTINGS))
