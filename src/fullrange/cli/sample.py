"""``fullrange sample``: its sampling flags are the fields of :class:`fullrange.sd.sample.SampleSettings`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from ..config import from_dict
from ..files import read_text
from ..sd.sample import SampleSettings
from ._errors import fail, library_errors, warnings_as_lines
from ._options import (
    MODEL_FLAGS,
    Adapter,
    AdapterStrength,
    AllowPickle,
    Dtype,
    Model,
    ModelConfigDir,
    NumImages,
    Progress,
    Sha256,
    dtype_of,
    field_flags,
    load_model,
    tables,
    with_fields,
)

ERROR_NAMES = MODEL_FLAGS | field_flags(SampleSettings)
ERROR_NAMES |= {name: "--" + name.replace("_", "-") for name in ("adapter", "controlnet", "num_images", "batch_size")}
"""How the fields the library names in its errors are spelled here."""


Out = Annotated[
    Path, typer.Option(help="Output folder for the PNGs (SEED-PROMPT.png) and a grid; nothing is overwritten.")
]
Prompt = Annotated[list[str] | None, typer.Option(help="Prompt (repeatable).")]
PromptsFile = Annotated[Path | None, typer.Option(help="A text file with one prompt per line.")]
BatchSize = Annotated[
    int,
    typer.Option(
        help="Images sampled at once (image i keeps seed + i; stochastic samplers' noise depends on the batch)."
    ),
]
SameSeed = Annotated[
    bool, typer.Option("--same-seed", help="Image j of every prompt from the same seed (compare prompts on one noise).")
]
ControlNet = Annotated[Path | None, typer.Option(help="A ControlNet (diffusers folder) to condition on.")]
Prediction = Annotated[
    str | None,
    typer.Option(help="What the model predicts: epsilon, v_prediction or sample [default: its markers' or config's]."),
]
ZeroTerminalSNR = Annotated[
    bool | None, typer.Option(help="Whether it was trained with zero terminal SNR [default: its markers' or config's].")
]


PROMPTS_LIMIT = 2**24
"""The largest --prompts-file read (16 MiB)."""


def read_prompts(prompt: list[str] | None, prompts_file: Path | None) -> list[str]:
    """The ``--prompt`` values, then the non-empty lines of ``--prompts-file``; at least one."""
    prompts = list(prompt or [])
    if prompts_file is not None:
        if not prompts_file.is_file():
            fail(f"--prompts-file {prompts_file}: no such file")
        try:
            lines = read_text(prompts_file, limit=PROMPTS_LIMIT).splitlines()
            prompts += [line.strip() for line in lines if line.strip()]
        except ValueError as err:
            fail(f"--prompts-file {err}")
    if not prompts:
        fail("give at least one --prompt or a --prompts-file")
    return prompts


def sample_command(
    model: Model,
    out: Out,
    prompt: Prompt = None,
    prompts_file: PromptsFile = None,
    num_images: NumImages = 1,
    batch_size: BatchSize = 1,
    same_seed: SameSeed = False,
    adapter: Adapter = None,
    adapter_strength: AdapterStrength = 1.0,
    controlnet: ControlNet = None,
    prediction: Prediction = None,
    zero_terminal_snr: ZeroTerminalSNR = None,
    dtype: Dtype = "fp32",
    sha256: Sha256 = None,
    model_config: ModelConfigDir = None,
    allow_pickle: AllowPickle = False,
    progress: Progress = True,
    **fields,
) -> None:
    """Sample Stable Diffusion with fullrange's samplers; PNGs carry their settings."""
    from ..sd.pnginfo import source
    from ..sd.sample import check_counts, sample_to_folder

    prompts = read_prompts(prompt, prompts_file)
    weights = dtype_of(dtype)
    if out.exists() and not out.is_dir():
        fail(f"--out {out}: is a file, not a directory")
    with library_errors(ERROR_NAMES), warnings_as_lines():
        check_counts(num_images, batch_size)
        settings = from_dict(SampleSettings, tables(fields))
        if (controlnet is None) != (settings.control_image is None):
            fail("--controlnet and --control-image go together: give both or neither")
        overrides = {"prediction": prediction, "zero_terminal_snr": zero_terminal_snr}
        sd_model = load_model(model, sha256, model_config, allow_pickle, **overrides)
        control = _controlnet(controlnet, sd_model, allow_pickle)
        sd_model = _adapted(sd_model, adapter, adapter_strength, prediction, zero_terminal_snr)
        for network in (sd_model, control):
            if network is not None:
                network.to(dtype=weights)
        made = source(sd_model, adapter, adapter_strength, dtype)
        counts = {"num_images": num_images, "batch_size": batch_size, "same_seed": same_seed, "progress": progress}
        paths, grid = sample_to_folder(sd_model, prompts, settings, out, controlnet=control, source=made, **counts)
    typer.echo(f"wrote {len(paths)} images ({paths[0].name} …) and {grid}", err=True)


def _controlnet(path: Path | None, model, allow_pickle: bool):
    from ..sd.load import load_controlnet

    return None if path is None else load_controlnet(path, model, allow_pickle)


def _adapted(model, adapter: Path | None, strength: float, prediction: str | None, zero_terminal_snr: bool | None):
    """The model with ``--adapter`` at ``--adapter-strength``, sampled as ``--prediction`` and
    ``--zero-terminal-snr`` say where they are given."""
    from ..sampling import retrained
    from ..sd import load_adapter

    if adapter is not None:
        model = load_adapter(model, adapter, strength)
    if prediction is None and zero_terminal_snr is None:
        return model
    try:
        spec = retrained(model.spec, prediction, zero_terminal_snr)
    except ValueError as err:
        fail(f"--prediction / --zero-terminal-snr: {err}")
    return dataclasses.replace(model, spec=spec)


sample_command = with_fields(sample_command, SampleSettings)
