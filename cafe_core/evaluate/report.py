"""The evaluation report: one self-contained HTML page (tables, plots inlined), readable from S3 or the
KFP UI without any other file or network access."""

from __future__ import annotations

import base64
import html
from typing import Any, Sequence

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.meta td { text-align: left; } code { font-size: 0.9em; }
"""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def image_html(name: str, png: bytes) -> str:
    """A titled PNG inlined (the page needs no other file)."""
    data = base64.b64encode(png).decode()
    return f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"


def render_report(record: dict[str, Any], tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]],
                  images: dict[str, bytes]) -> str:
    meta = [["run", record["run_id"]], ["checkpoint", record["checkpoint"]],
            ["checkpoint digest", record.get("checkpoint_digest")], ["code", record["code_version"]],
            ["config digest", record["config_digest"]], ["created", record["created"]],
            ["families", ", ".join(record.get("families", []))]]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>cafe evaluation {html.escape(record['run_id'])}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>Evaluation of run {html.escape(record['run_id'])}</h1>",
             table(["", ""], meta, "meta")]
    for title, header, rows in tables:
        parts += [f"<h2>{html.escape(title)}</h2>", table(header, rows)]
    parts += [image_html(name, png) for name, png in images.items()]
    parts += ["<h2>All metrics</h2>", table(["metric", "value"], list(record["metrics"].items())), "</body></html>"]
    return "\n".join(parts)


def metrics_markdown(metrics: dict[str, float], prefixes: Sequence[str] = ()) -> str:
    """A compact Markdown table (for the command line summary and KFP Markdown artifacts)."""
    rows = [(k, v) for k, v in metrics.items() if not prefixes or k.startswith(tuple(prefixes))]
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in rows]
    return "\n".join(lines)


def side_by_side_markdown(metrics: dict[str, float], before: dict[str, float], prefixes: Sequence[str] = (),
                          names: tuple[str, str] = ("base", "fine-tuned")) -> str:
    """`metrics` beside `before` (e.g. the base model's card), with the change; a metric either lacks is "n/a"."""
    keys = [k for k in metrics if not prefixes or k.startswith(tuple(prefixes))]
    lines = [f"| metric | {names[0]} | {names[1]} | change |", "|---|---|---|---|"]
    for k in keys:
        old, new = before.get(k), metrics[k]
        both = isinstance(old, (int, float)) and isinstance(new, (int, float))
        change = f"{new - old:+.4f}" if both else "n/a"
        lines.append(f"| {k} | {_cell(old) if old is not None else 'n/a'} | {_cell(new)} | {change} |")
    return "\n".join(lines)
