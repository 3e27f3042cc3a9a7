"""The report: a summary table of verdicts, then each experiment's plots, grids and findings (Markdown + HTML)."""

from __future__ import annotations

import base64
import html
import inspect
import json
from pathlib import Path

from ..toy import LABELS

ORDER = ("schedule_facts", "exact_sweep", "from_scratch", "finetune", "guidance", "sample_steps", "training_free")


def _results(out: Path) -> list[dict]:
    found = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/results.json")}
    return [found[n] for n in ORDER if n in found] + [v for k, v in sorted(found.items()) if k not in ORDER]


def write_report(out: Path) -> Path:
    """Write ``report.md`` and a self-contained ``report.html`` (images inlined) from ``*/results.json``."""
    results = _results(out)
    md = ["# fullrange reproduction report", ""]
    if results:
        preset = results[0]["preset"]
        md += [
            f"Preset **{preset['name']}**: {preset['channels']}×{preset['size']}×{preset['size']} images, "
            f"{preset['num_images']} of them, {preset['train_steps']} training steps per recipe, sampler "
            f"`{preset['sampler']}` with {preset['sample_steps']} steps. Every number below was measured in this "
            "run; the verdicts follow from them by the rule stated in each experiment's code.",
            "",
        ]
    md += ["## Summary", "", "| experiment | claim | verdict | evidence |", "|---|---|---|---|"]
    for r in results:
        for f in r["findings"]:
            md.append(f"| {r['name']} | {f['claim']} | **{f['verdict']}** | {f['evidence']} |")
    for r in results:
        md += ["", f"## {r['name']}", "", inspect.cleandoc(r.get("doc") or ""), "", f"Ran in {r['seconds']} s.", ""]
        for f in r["findings"]:
            md.append(f"- **{f['verdict']}**: {f['claim']}. {f['evidence']}.")
        for image in r.get("plots", []):
            md += ["", f"![{image}]({r['name']}/{image})"]
        for image in r.get("grids", []):
            md += [
                "",
                f"Samples `{image}`, one row per label: {', '.join(r.get('grid_labels', LABELS))}.",
                "",
                f"![{image}]({r['name']}/{image})",
            ]
    text = "\n".join(md) + "\n"
    report = out / "report.md"
    report.write_text(text)
    (out / "report.html").write_text(_html(text, out))
    return report


def _html(markdown: str, out: Path) -> str:
    """A small Markdown subset (headings, tables, lists, images, bold, code) to HTML with inlined images."""
    body, table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not table else "td"
            body.append(
                ("<table>" if not table else "")
                + "<tr>"
                + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells)
                + "</tr>"
            )
            table = True
            continue
        if table:
            body.append("</table>")
            table = False
        if line.startswith("!["):
            src = line[line.index("(") + 1 : -1]
            data = base64.b64encode((out / src).read_bytes()).decode() if (out / src).exists() else ""
            body.append(f'<p><img alt="{html.escape(src)}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    if table:
        body.append("</table>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
        "img{max-width:100%}"
    )
    head = f"<head><meta charset='utf-8'><title>fullrange report</title><style>{style}</style></head>"
    return f"<!doctype html><html>{head}<body>{''.join(body)}</body></html>"


def _inline(text: str) -> str:
    text = html.escape(text)
    parts = text.split("**")
    text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
