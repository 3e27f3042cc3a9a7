"""The report (Markdown + HTML): a TL;DR with the main figure and every verdict, contents, how to read it, each
experiment's findings, plots and grids, and provenance (commit, versions, machine, time per experiment)."""

from __future__ import annotations

import base64
import html
import inspect
import json
import re
from pathlib import Path

from ..files import write_bytes

ORDER = (
    "schedule_facts",
    "exact_sweep",
    "from_scratch",
    "finetune",
    "convert",
    "guidance",
    "sample_steps",
    "training_free",
)


def _results(out: Path) -> list[dict]:
    found = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/results.json")}
    return [found[n] for n in ORDER if n in found] + [v for k, v in sorted(found.items()) if k not in ORDER]


TITLES = {
    "schedule_facts": "does SD's schedule leak the image mean?",
    "exact_sweep": "with an exact denoiser, which schedules and steps keep the range?",
    "from_scratch": "trained from scratch, which recipes reach the full range?",
    "finetune": "fine-tuned on one black image, which recipe gets there?",
    "convert": "an SD-recipe model converted to flow: how far, and when to stop?",
    "guidance": "guidance at zero terminal SNR: over-exposure, its rescale, colour casts",
    "sample_steps": "where sampling starts: leading, linspace or trailing steps",
    "training_free": "no fine-tuning: the leak-aware start",
}
MARKS = {"reproduced": "🟢", "partly": "🟡", "not reproduced": "🔴"}
SMOKE_TESTS = ("micro",)
"""Presets that test the code, not the findings: their reports show no verdict."""
MAIN_FIGURES = (("from_scratch", "before_after.png"), ("from_scratch", "per_label_brightness.png"))
HOW_TO_READ = [
    "- **Brightness** of an image is the mean of its pixels, 0 black to 1 white. The data set's images run from "
    "solid black to solid white, with labels standing for prompts.",
    "- **Spread ratio**: the std of the samples' brightness over the data's; 1.0 is the data's range, below "
    "compresses it toward grey, above over-disperses it.",
    "- **W1**: the Wasserstein-1 distance between the samples' brightness and the data's (0 is the data). Verdicts "
    "score closeness to the data (W1, |spread ratio − 1|, the gap to a target), never which number is larger.",
    "- **Seeds**: every trained-model figure is measured once per seed (its own initialisation, training draws and "
    "sampling noise) and printed as `mean (lowest–highest)` over the seeds. Figures without a range need no "
    "seed (formulas) or use an exact denoiser (one noise draw).",
    "- **Verdicts**: 🟢 **reproduced**, the claim holds in every seed (for a change that should bring samples "
    "closer to the data: closer in every seed and by 25% on average); 🟡 **partly**, on average or in some seeds; "
    "🔴 **not reproduced**, neither. Each finding states its rule.",
    "- **Sample grids**: one row per label, two images of the data with that label on the left, the samples on "
    "the right, upscaled without smoothing.",
]


def write_report(out: Path) -> Path:
    """Write ``report.md`` and a self-contained ``report.html`` (images inlined) from ``*/results.json``: a TL;DR
    with the main figure and every verdict, contents, how to read it, each experiment, and provenance."""
    results = _results(out)
    findings = [(r, f) for r in results for f in r["findings"]]
    md = ["# fullrange reproduction report", ""]
    if results:
        preset = results[0]["preset"]
        seeds = preset.get("seeds", [preset["seed"]])
        total = sum(r["seconds"] for r in results)
        counts = {v: sum(f["verdict"] == v for _, f in findings) for v in MARKS}
        smoke = preset["name"] in SMOKE_TESTS
        md += [
            f"Preset **{preset['name']}**: {preset['channels']}×{preset['size']}×{preset['size']} images, "
            f"{preset['num_images']} of them; {preset['train_steps']} training steps per recipe and seed, "
            f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); sampler `{preset['sampler']}` with "
            f"{preset['sample_steps']} steps. {_minutes(total)} in all. Every number below was measured in this run.",
            "",
            "## TL;DR",
            "",
            (
                f"The {preset['name']} preset is a smoke test of the code: its models train for a few steps and say "
                "nothing about the findings, so no verdict is shown. Run the quick preset for them."
                if smoke
                else f"{len(findings)} findings: " + ", ".join(f"{MARKS[v]} {counts[v]} {v}" for v in MARKS) + "."
            )
            + " Below: the same noise through a model trained with SD's recipe and one trained with zero terminal "
            "SNR (first seed; two data images of each label on the left); then, for every recipe, the mean "
            "brightness each label reaches (grey bars: the data; error bars: the range over seeds).",
        ]
        for name, image in MAIN_FIGURES:
            if (out / name / image).exists():
                md += ["", f"![{image}]({name}/{image})"]
        md += ["", "| finding | verdict | measured |", "|---|---|---|"]
        for r, f in findings:
            md.append(f"| {f['claim']} ([{r['name']}](#{r['name']})) | {_verdict(f, smoke)} | {f['evidence']} |")
        md += ["", "## Contents", ""]
        md += [f"- [{r['name']}](#{r['name']}): {TITLES.get(r['name'], '')}" for r in results]
        md += ["- [How to read this](#how-to-read-this)", "- [Provenance](#provenance)"]
        how = [line for line in HOW_TO_READ if not (smoke and line.startswith("- **Verdicts**"))]
        md += ["", "## How to read this", "", *how]
    smoke = bool(results) and results[0]["preset"]["name"] in SMOKE_TESTS
    for r in results:
        md += ["", f"## {r['name']}", "", inspect.cleandoc(r.get("doc") or ""), "", f"Ran in {r['seconds']} s.", ""]
        for f in r["findings"]:
            rule = f" (rule: {f['rule']})" if f.get("rule") else ""
            md.append(f"- {_verdict(f, smoke)}: {f['claim']}. {f['evidence']}.{rule}")
        for image in r.get("plots", []):
            md += ["", f"![{image}]({r['name']}/{image})"]
        for image in r.get("grids", []):
            md += [
                "",
                f"Samples `{image}` (first seed): one row per label; two data images of the label, then samples.",
                "",
                f"![{image}]({r['name']}/{image})",
            ]
    if results:
        md += ["", "## Provenance", "", "| experiment | time | commit | finished |", "|---|---|---|---|"]
        for r in results:
            p = r.get("provenance", {})
            md.append(f"| {r['name']} | {r['seconds']} s | `{p.get('commit')}` | {p.get('finished')} |")
        last = results[-1].get("provenance", {})
        if last:
            md += [
                "",
                f"Machine: {last['machine']}. Versions: "
                + ", ".join(f"{k} {v}" for k, v in last["versions"].items())
                + ". A commit marked `+dirty` had uncommitted changes.",
            ]
    text = "\n".join(md) + "\n"
    report = out / "report.md"
    write_bytes(report, text.encode())
    write_bytes(out / "report.html", _html(text, out).encode())
    return report


def _verdict(finding: dict, smoke: bool = False) -> str:
    if smoke:
        return "— (smoke test)"
    return f"{MARKS.get(finding['verdict'], '')} **{finding['verdict']}**"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60)} s"


def _html(markdown: str, out: Path) -> str:
    """A small Markdown subset (headings, tables, lists, images, bold, code) to HTML with inlined images."""
    body, table, paragraph = [], False, []

    def flush() -> None:  # consecutive text lines are one paragraph, as in Markdown
        if paragraph:
            body.append(f"<p>{_inline(' '.join(paragraph))}</p>")
            paragraph.clear()

    for line in markdown.splitlines():
        if line.strip() and not line.startswith(("|", "![", "#", "- ")):
            paragraph.append(line.strip())
            continue
        flush()
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
            title = line[level:].strip()
            anchor = re.sub(r"[^a-z0-9_ -]", "", title.lower()).replace(" ", "-")
            body.append(f'<h{level} id="{anchor}">{_inline(title)}</h{level}>')
        elif line.startswith("- "):
            body.append(f"<li>{_inline(line[2:])}</li>")
    flush()
    if table:
        body.append("</table>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
        "img{max-width:100%;image-rendering:pixelated}.reproduced{color:#137a2c}.partly{color:#a86b00}"
        ".not-reproduced{color:#b3261e}"
    )
    head = f"<head><meta charset='utf-8'><title>fullrange report</title><style>{style}</style></head>"
    return f"<!doctype html><html>{head}<body>{''.join(body)}</body></html>"


def _inline(text: str) -> str:
    text = html.escape(text)
    parts = text.split("**")
    text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    text = re.sub(r"\[([^\]]+)\]\((#[\w-]+)\)", r'<a href="\2">\1</a>', text)
    for verdict, mark in MARKS.items():  # a coloured dot: the emoji need a font a browser may not have
        css = verdict.replace(" ", "-")
        text = text.replace(f"<b>{verdict}</b>", f'<b class="{css}">{verdict}</b>').replace(
            mark, f'<span class="{css}">●</span>'
        )
    return text
