"""A self-contained HTML report: headings, tables, figures (PNG files beside it), notes.

Usage::

    rep = Report("NEU multiscale", synthetic=False)
    rep.table("Test metrics", rows, columns)
    rep.image("plots/confusion_matrix.png", "Confusion matrix")
    rep.write(run_dir / "report.html")
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from defectscope.utils.io import write_text


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


class Report:
    """Builder for ``report.html``.

    Args:
        title: page title.
        synthetic: ``True`` puts a "SYNTHETIC DATA" banner on top (simulated weld data).
    """

    def __init__(self, title: str, synthetic: bool = False) -> None:
        self.title = title
        self.parts: list[str] = []
        if synthetic:
            self.parts.append(
                '<p class="synthetic">SYNTHETIC DATA: every figure on this page was measured on simulated data, '
                "not on real welds.</p>"
            )

    def heading(self, text: str, level: int = 2) -> "Report":
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")
        return self

    def text(self, text: str) -> "Report":
        self.parts.append(f"<p>{html.escape(text)}</p>")
        return self

    def kv(self, title: str, items: dict[str, Any]) -> "Report":
        """A two-column table of named values."""
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in items.items())
        self.parts.append(f"<h3>{html.escape(title)}</h3><table>{rows}</table>")
        return self

    def table(self, title: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> "Report":
        """A table with one row per dict; ``columns`` fixes the order (default: keys of the first row)."""
        if not rows:
            return self
        columns = columns or list(rows[0])
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
        self.parts.append(f"<h3>{html.escape(title)}</h3><table><tr>{head}</tr>{body}</table>")
        return self

    def image(self, rel_path: str | Path, caption: str) -> "Report":
        """A figure; ``rel_path`` is relative to the report's folder."""
        self.parts.append(
            f'<figure><img src="{html.escape(str(rel_path))}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
        return self

    def render(self) -> str:
        style = (
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            "th{background:#f3f3f3}figure{display:inline-block;margin:0.5em}img{max-width:100%}"
            ".synthetic{background:#ffe08a;padding:0.6em;font-weight:bold;border:1px solid #c90}"
        )
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(self.title)}</h1>{''.join(self.parts)}</body></html>\n"
        )

    def write(self, path: str | Path) -> Path:
        """Write the HTML atomically."""
        return write_text(path, self.render())


def append_kv(path: str | Path, title: str, items: dict[str, Any]) -> Path:
    """Append a two-column table (as :meth:`Report.kv`) at the end of an existing report's body,
    written atomically.

    Raises:
        ValueError: ``path`` is not a report written by :class:`Report` (no ``</body>``).
    """
    text = Path(path).read_text(encoding="utf-8")
    if "</body>" not in text:
        raise ValueError(f"{path}: not a defectscope report (no </body>)")
    part = Report("").kv(title, items).parts[-1]
    head, _, tail = text.rpartition("</body>")
    return write_text(path, head + part + "</body>" + tail)
