"""Every option the commands share, declared once with one type and one meaning, and the options made from config
fields: a field declared with :func:`fullrange.config.setting` is an option whose help and stated default come
from the field, and whose flag is ``--field-name`` unless :data:`FLAG_NAMES` spells it otherwise."""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Annotated

import typer

from ..sd.config import ModelConfig, OutputConfig
from ._errors import fail

FLAG_NAMES = {
    "model.path": "--model",
    "model.config": "--model-config",
    "data.path": "--data",
    "noise.offset": "--offset-noise",
    "noise.pyramid": "--pyramid-noise",
    "adapter.kind": "--adapter",
    "adapter.rank": "--lora-rank",
    "adapter.block_size": "--oft-block-size",
    "adapter.coft": "--oft-coft",
    "adapter.text_encoder": "--text-encoder-lora",
    "train.steps": "--max-steps",
    "validation.prompts": "--validation-prompt",
    "output.path": "--out",
}
"""Config fields whose flag is not ``--`` and the field's own name (its table left out)."""


def flag(field: str) -> str:
    """The flag of a config field, ``table.name`` or ``name``."""
    return FLAG_NAMES.get(field) or "--" + field.rpartition(".")[2].replace("_", "-")


def _leaves(cls, prefix: str = "") -> list[tuple[str, dataclasses.Field, object]]:
    """``(dotted name, field, type)`` of every field of the config dataclass ``cls``, nested tables opened."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f, hints[f.name]))
    return out


def field_flags(cls) -> dict[str, str]:
    """Every field of ``cls`` (dotted, nested tables opened) and its flag: how errors in config terms are spelled."""
    return {name: flag(name) for name, _, _ in _leaves(cls)}


def _help(f: dataclasses.Field, names: dict[str, str]) -> str:
    """The field's help, other fields (in backticks) named by their flags, and its default as ``[default: …]``."""

    def spell(text: str) -> str:
        return re.sub(r"`([\w.]+)`", lambda m: names.get(m.group(1), m.group(1)), text)

    shown = f.metadata.get("shown")
    default = f.default
    if shown is None and not (default is dataclasses.MISSING or default is None or default is False):
        shown = None if default in ("", ()) else default
    text = spell(f.metadata.get("help", ""))
    return text if shown is None else f"{text} [default: {spell(str(shown))}]"


def _cli_type(kind):
    """The command line's type for a config type: ``X | None`` → X, ``tuple[str, ...]`` → a repeatable ``list``."""
    if isinstance(kind, types.UnionType):
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if typing.get_origin(kind) is tuple:
        return list[typing.get_args(kind)[0]]
    return kind


def field_parameters(cls, only: tuple[str, ...] | None = None, prefix: str = "") -> list[inspect.Parameter]:
    """Keyword parameters for a typer command, one per field of ``cls`` (its fields named ``prefix`` + name; ``only``
    these, if given), each an option defaulting to ``None`` (not given: the config's own default applies). A field
    ``table.name`` is the parameter ``table__name``; a bool field is a flag that turns it on."""
    every = _leaves(cls, prefix)
    names = {name: flag(name) for name, _, _ in every} | {name.rpartition(".")[2]: flag(name) for name, _, _ in every}
    params = []
    for name, f, kind in every:
        if only is not None and name not in only:
            continue
        option = typer.Option(flag(name), help=_help(f, names), show_default=False)
        annotation = Annotated[_cli_type(kind) | None, option]
        keyword = inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(name.replace(".", "__"), keyword, default=None, annotation=annotation))
    return params


def with_fields(command, cls, only: tuple[str, ...] | None = None):
    """``command`` taking, besides its own parameters, an option for each field of ``cls`` (:func:`field_parameters`),
    which it receives in its ``**fields`` keyword arguments (read them with :func:`tables`)."""
    own = inspect.signature(command, eval_str=True).parameters.values()
    own = [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = inspect.Signature([*own, *field_parameters(cls, only)])
    return command


def tables(fields: dict) -> dict:
    """The options given (not ``None``, not an empty list) as nested tables: ``{"train__lr": 0.1}`` →
    ``{"train": {"lr": 0.1}}``."""
    out: dict = {}
    for key, value in fields.items():
        if value is None or value == []:
            continue
        *path, name = key.split("__")
        table = out
        for part in path:
            table = table.setdefault(part, {})
        table[name] = value
    return out


def _field_option(cls, name: str, table: str):
    """The option of the field ``name`` of the table ``table`` (a ``cls``), as a type for a command's parameter."""
    (param,) = field_parameters(cls, (f"{table}.{name}",), prefix=f"{table}.")
    return param.annotation


Model = _field_option(ModelConfig, "path", "model")
Sha256 = _field_option(ModelConfig, "sha256", "model")
ModelConfigDir = _field_option(ModelConfig, "config", "model")
AllowPickle = _field_option(ModelConfig, "allow_pickle", "model")
Family = _field_option(OutputConfig, "family", "output")
MODEL_FLAGS = {f"model.{name}": flag(f"model.{name}") for name in ("path", "sha256", "config", "allow_pickle")}

Adapter = Annotated[
    Path | None,
    typer.Option(
        "--adapter",
        help="A LoRA (a .safetensors file in diffusers', kohya's or peft's names, or a folder) or an OFT folder, as "
        "fullrange train writes them.",
    ),
]
AdapterStrength = Annotated[float, typer.Option(help="Strength of the adapter (LoRA scale; OFT rotation fraction).")]
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
Dtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        "--precision",
        help="fp32, fp16 or bf16 weights (export's default: fp16 in a single file, fp32 in a diffusers folder).",
    ),
]


def dtype_of(name: str):
    """The torch dtype a ``--dtype`` names."""
    import torch

    if name not in DTYPES:
        fail(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


Progress = Annotated[bool, typer.Option(help="Show progress bars.")]
NumImages = Annotated[int, typer.Option(help="Images per prompt.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out (never one of the inputs).")]


def load_model(model: str, sha256: str | None, config: str | None, allow_pickle: bool, **overrides):
    """The model the loading options name (:class:`~fullrange.sd.config.ModelConfig`), on the device fullrange
    samples on; errors name the options in config terms (``model.path``: :data:`MODEL_FLAGS` spells them).
    ``overrides``: ``prediction`` / ``zero_terminal_snr`` over what the checkpoint says."""
    from ..config import ConfigError
    from ..sd import load_stable_diffusion
    from ..sd.load import inference_device

    try:
        checked = ModelConfig(model, sha256, config, allow_pickle)
    except ConfigError as err:
        raise err.within("model") from None
    return load_stable_diffusion(checked, **overrides).to(inference_device())
