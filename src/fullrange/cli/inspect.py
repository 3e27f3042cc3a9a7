"""``fullrange inspect``: how a checkpoint must be sampled."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from ._errors import fail, library_errors
from ._options import MODEL_FLAGS, Adapter, AllowPickle, ModelConfigDir, Sha256


def inspect_command(
    model: Annotated[str, typer.Argument(help="Diffusers folder or single .safetensors file.")],
    adapter: Adapter = None,
    probe: Annotated[bool, typer.Option("--probe", help="Run the probe even when the markers agree.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    tool: Annotated[
        str | None,
        typer.Option(
            "--for",
            help="Also print the settings for comfyui, a1111, forge, diffusers or invokeai, and warn where that "
            "tool reads the file wrongly.",
        ),
    ] = None,
    sha256: Sha256 = None,
    model_config: ModelConfigDir = None,
    allow_pickle: AllowPickle = False,
) -> None:
    """Say how a checkpoint must be sampled: family, prediction type and zero terminal SNR from every convention
    (diffusers, ComfyUI, kohya, modelspec), a probe where they are silent or disagree, and the settings to use."""
    from ..sd.config import ModelConfig
    from ..sd.inspection import inspect
    from ..sd.tools import TOOLS, settings_for

    if adapter is not None and not adapter.exists():
        fail(f"--adapter {adapter}: no such file or directory")
    if tool is not None and tool not in TOOLS:
        fail(f"--for {tool}: not one of {', '.join(TOOLS)}")
    with library_errors(MODEL_FLAGS | {"model.path": "MODEL", "adapter": "--adapter"}):
        config = ModelConfig(model, sha256, model_config, allow_pickle)
        found = inspect(config, None if adapter is None else str(adapter), always_probe=probe)
    advice = None if tool is None else settings_for(tool, found, config.path)
    if as_json:
        typer.echo(json.dumps(json.loads(found.to_json()) | ({"for": asdict(advice)} if advice else {}), indent=2))
        return
    lines = _lines(found, config, adapter)
    if advice is not None:
        lines += [f"for {tool}:", *(f"  {line}" for line in advice.settings)]
        lines += [f"warning: {line}" for line in advice.warnings]
    typer.echo("\n".join(lines))


def _lines(found, config, adapter: Path | None) -> list[str]:
    """The lines ``inspect`` prints for an :class:`~fullrange.sd.inspection.Inspection` of the model ``config``
    names, with ``adapter``: metadata from the files escaped, the command to sample it exactly as it must be."""
    lines = [f"family: {found.family}", "markers:"]
    for m in found.found or ():
        meaning = m.prediction if m.prediction is not None else f"zero terminal SNR {m.zero_terminal_snr}"
        lines.append(f"  {m.convention:<9} {_shown(m.key)} = {_shown(m.value)} -> {meaning}  ({_shown(m.source)})")
    if not found.found:
        lines.append("  none")
    lines += [f"  disagree on {c}" for c in found.decision.conflicts]
    if found.probe is not None:
        lines.append(f"probe: {found.probe.describe()}")
    given = {"--model": config.path, "--model-config": config.config, "--adapter": adapter}
    given |= {"--sha256": config.sha256, "--allow-pickle": config.allow_pickle or None}
    words = [f"{k} {shlex.quote(str(v))}" if v is not True else k for k, v in given.items() if v is not None]
    flags = " ".join([*words, *(_flag(k, v) for k, v in found.settings.items())])
    return [
        *lines,
        f"prediction: {found.prediction} (from the {found.how['prediction']})",
        f"zero terminal SNR: {'on' if found.zero_terminal_snr else 'off'} ({found.how['zero_terminal_snr']})",
        *(f"note: {note}" for note in found.notes),
        f"sample with: fullrange sample {flags} --prompt PROMPT --out FOLDER",
        "diffusers scheduler config:",
        json.dumps(found.scheduler_config, indent=2),
    ]


def _shown(value) -> str:
    """Text from a file, printable: control characters (a terminal's escape sequences) written as ``\\xNN``."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(value))


def _flag(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else flag.replace("--", "--no-", 1)
    return f"{flag} {value}"
