"""``fullrange train``: its flags are the fields of the tables of :class:`fullrange.sd.config.FinetuneConfig`, made
by :func:`~fullrange.cli._options.with_fields`; a ``--config`` TOML file gives the same tables (or the flags as flat
keys), and the flags given are laid over it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..sd.config import FinetuneConfig
from ._errors import INTERRUPTED, fail, library_errors
from ._options import Progress, field_flags, flag, tables, with_fields

FLAGS = field_flags(FinetuneConfig)
"""Every field of the tables and its flag."""
FLAT_ALIASES = {"--validation-prompts": "--validation-prompt"}
"""Keys of flat --config files written before the flag and the key were spelled alike."""
ERROR_NAMES = FLAGS | {
    "resume": "--resume",
    "model.fingerprint": "the --model weights",
    "data.fingerprint": "the --data images and captions",
}
"""How the fields the library names in its errors are spelled here."""


def _nest(flat: dict, source: str) -> dict:
    """Flat keys spelled as the flags (``max-steps``, ``max_steps``) as the tables they belong to."""
    fields = {flag_: field for field, flag_ in FLAGS.items()}
    out: dict = {}
    for key, value in flat.items():
        name = "--" + key.replace("_", "-")
        field = fields.get(FLAT_ALIASES.get(name, name))
        if field is None:
            raise ValueError(f"{source}: unknown option {key!r}")
        table, _, name = field.partition(".")
        out.setdefault(table, {})[name] = value
    return out


def train_tables(config_file: Path | None, given: dict) -> dict:
    """The nested tables of a run: those of ``config_file`` (nested tables, or flat keys spelled as the flags), with
    the tables of the flags ``given`` laid over them."""
    from ..sd.config import merge, read_toml

    if config_file is None:
        return given
    raw = read_toml(config_file)
    flat = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    nested = {k: v for k, v in raw.items() if isinstance(v, dict)}
    return merge(merge(nested, _nest(flat, f"--config {config_file}")), given)


def train_command(
    config: Annotated[
        Path | None,
        typer.Option(
            help="TOML file: tables [model], [data], [noise], [adapter], [train], [validation], [output], or these "
            "flags as keys. Flags override it."
        ),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT's checkpoint.")] = False,
    progress: Progress = True,
    **fields,
) -> None:
    """Fine-tune Stable Diffusion on a folder of images with offset noise, zero terminal SNR, LoRA or OFT."""
    from ..sd.config import finetune_config
    from ..sd.finetune import finetune
    from ..train import TrainingInterrupted

    with library_errors(ERROR_NAMES):
        options = finetune_config(train_tables(config, tables(fields)))
        out = options.output.path
        has_checkpoint = Path(out, "train", "checkpoint.safetensors").exists()
        if has_checkpoint and not resume:
            fail(
                f"{flag('output.path')} {out} holds a checkpoint: pass --resume to continue it, or choose a new folder"
            )
        if resume and not has_checkpoint:
            typer.echo(f"--resume: {out} holds no checkpoint yet; starting at step 0", err=True)
        try:
            finetune(options, progress=progress, log=lambda line: typer.echo(line, err=True))
        except TrainingInterrupted as err:
            typer.echo(str(err) + " with --resume", err=True)
            raise typer.Exit(INTERRUPTED) from None


train_command = with_fields(train_command, FinetuneConfig)
