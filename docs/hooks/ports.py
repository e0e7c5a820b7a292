"""mkdocs hook: the ports table, rendered from `ports/*.py` at build time.

`docs/reference/ports.md` holds the prose and one marker line, `<!-- bcjax:ports -->`, which this
hook replaces with one row per port (`ports.NAMES`): its model preset, every `PipelineConfig`
field of its sampler, the timesteps it runs (after warping) and where upstream the numbers were
read. So the table is what `ports.get(name)` returns, never a copy.
"""

from __future__ import annotations

import dataclasses

from mkdocs.exceptions import PluginError

PAGE = "reference/ports.md"
MARKER = "<!-- bcjax:ports -->"


def _cell(value) -> str:
    if isinstance(value, tuple | list):
        value = ", ".join(_cell(v) for v in value)
    elif isinstance(value, float):
        value = f"{value:g}"
    return str(value).replace("|", "\\|")


def render() -> str:
    import ports

    rows = [ports.get(name) for name in ports.NAMES]
    fields = [f.name for f in dataclasses.fields(rows[0].pipeline)]
    head = ["port", "model", *fields, "timesteps run", "read from"]
    lines = ["| " + " | ".join(f"`{h}`" if h in fields else h for h in head) + " |",
             "|" + "---|" * len(head)]
    for port in rows:
        pcfg = port.pipeline
        cells = [f"`{port.name}`", f"`{port.model}`", *(_cell(getattr(pcfg, f)) for f in fields),
                 _cell([round(float(t), 2) for t in pcfg.timesteps]), _cell(port.source)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- `{p.name}`: {p.notes}" for p in rows if p.notes]
    return "\n".join(lines) + ("\n\nNotes recorded with the ports:\n\n" + "\n".join(notes) if notes else "") + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"{PAGE}: the line {MARKER} (where the ports table goes) is missing")
    return markdown.replace(MARKER, render())
