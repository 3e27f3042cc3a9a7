"""CLIP's byte-level BPE tokenizer files, rebuilt offline from the merges fullrange ships (MIT, from OpenAI's CLIP
via open_clip; see NOTICE)."""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte → printable character map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def clip_tokenizer_files(folder: Path, config: dict) -> None:
    """Write CLIP's BPE tokenizer (``vocab.json``, ``merges.txt``) and its ``config`` into ``folder``.

    The vocabulary is rebuilt from the 48,894 merges as CLIP does: 256 byte symbols, the same with ``</w>``, one
    token per merge, then the start and end tokens (49,408 in all). The merges ship with fullrange (MIT, from
    OpenAI's CLIP via open_clip; see NOTICE).
    """
    data = resources.files("fullrange").joinpath("configs/clip_merges.txt.gz").read_bytes()
    merges = gzip.decompress(data).decode("utf-8").splitlines()
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
