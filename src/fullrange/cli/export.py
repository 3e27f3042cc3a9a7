"""``fullrange export``: files other tools load (single file, diffusers folder, kohya LoRA, LyCORIS OFT)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._errors import fail, library_errors, refuse_overwrite, warnings_as_lines
from ._options import (
    MODEL_FLAGS,
    Adapter,
    AdapterStrength,
    AllowPickle,
    Dtype,
    Family,
    Model,
    ModelConfigDir,
    Overwrite,
    Sha256,
    dtype_of,
    load_model,
)

FORMATS = ("single-file", "diffusers", "kohya", "lycoris")
ADAPTER_FORMATS = {"kohya": "lora", "lycoris": "oft"}
"""The formats that write an adapter alone, and the adapter each writes (:data:`fullrange.adapters.ADAPTERS`)."""
DEFAULT_DTYPE = {"single-file": "fp16", "diffusers": "fp32", "kohya": "fp32", "lycoris": "fp32"}
"""Weights as each format is best loaded: half-size single files (A1111 and ComfyUI cast them); diffusers folders
that plain ``from_pretrained`` samples on a CPU (an fp16 folder fails there: Half and Float in one matmul)."""
ERROR_NAMES = MODEL_FLAGS | {"adapter": "--adapter", "family": "--family"}


Out = Annotated[Path, typer.Option(help="The .safetensors file to write (a new folder with --format diffusers).")]
Format = Annotated[
    str,
    typer.Option(
        "--format",
        help="single-file: the model (adapter merged in) in the LDM layout; diffusers: the same as a diffusers folder "
        "with its scheduler config; kohya: the --adapter LoRA alone, in kohya's format; lycoris: the --adapter OFT as "
        "LyCORIS weight differences (--model is the base).",
    ),
]


def export_command(
    model: Model,
    out: Out,
    adapter: Adapter = None,
    adapter_strength: AdapterStrength = 1.0,
    family: Family = None,
    dtype: Dtype = None,
    file_format: Format = "single-file",
    overwrite: Overwrite = False,
    sha256: Sha256 = None,
    model_config: ModelConfigDir = None,
    allow_pickle: AllowPickle = False,
) -> None:
    """Write what A1111, ComfyUI or diffusers load: a single-file checkpoint (LDM layout) with v_pred / ztsnr markers,
    a diffusers folder, a LoRA in kohya's format or an OFT in LyCORIS', with ss_* / modelspec metadata."""
    from ..adapters import ADAPTERS
    from ..sd import load_adapter
    from ..sd.export import export, export_diffusers

    refuse_overwrite(out, {"--model": model, "--adapter": adapter, "--model-config": model_config})
    _check(out, file_format, adapter, overwrite)
    weights = dtype_of(dtype or DEFAULT_DTYPE[file_format])
    with library_errors(ERROR_NAMES):
        sd_model = load_model(model, sha256, model_config, allow_pickle)
        if file_format in ADAPTER_FORMATS:
            ADAPTERS[ADAPTER_FORMATS[file_format]].export(out, adapter, sd_model, family)
            typer.echo(f"wrote {out}: the adapter {adapter} in {file_format}'s format", err=True)
            return
        if adapter is not None:
            with warnings_as_lines():
                sd_model = load_adapter(sd_model, adapter, adapter_strength)
        if file_format == "diffusers":
            written = [export_diffusers(out, sd_model, dtype=weights, replace=overwrite)]
        else:
            written = export(out, sd_model, family=family, dtype=weights)
    spec = sd_model.spec
    beside = f" (beside it, for tools that ignore its markers: {', '.join(p.name for p in written[1:])})"
    typer.echo(
        f"wrote {out}: prediction {spec.prediction}, zero terminal SNR {spec.schedule.zero_terminal_snr}"
        + (beside if written[1:] else ""),
        err=True,
    )


def _check(out: Path, file_format: str, adapter: Path | None, overwrite: bool) -> None:
    """The format is known, has what it needs, and ``out`` can be what it writes (an existing one only with
    ``--overwrite``)."""
    if file_format not in FORMATS:
        fail(f"--format {file_format!r}: choose {', '.join(FORMATS[:-1])} or {FORMATS[-1]}")
    if file_format in ADAPTER_FORMATS and adapter is None:
        kind = {"lora": "a LoRA", "oft": "an OFT"}[ADAPTER_FORMATS[file_format]]
        fail(f"--format {file_format} writes {kind} adapter: give it with --adapter (a folder of fullrange train)")
    if file_format == "diffusers":
        if out.exists() and not (overwrite and out.is_dir()):
            fail(f"--out {out}: already exists; --format diffusers writes a new folder (or replaces one: --overwrite)")
    elif out.suffix != ".safetensors":
        fail(f"--out {out}: the file name must end in .safetensors")
    elif out.is_dir():
        fail(f"--out {out}: is a directory, not a file name")
    elif out.exists() and not overwrite:
        fail(f"--out {out}: already exists; give --overwrite to replace it")
