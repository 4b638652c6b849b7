"""The inspection report: ONE self-contained HTML file a quality engineer can mail or archive.

Inline CSS, images as ``data:`` URIs, an inline SVG histogram; no JavaScript libraries and no
external URL, so it renders the same offline on any line PC.  The only script is three lines
that mark each ``<img>`` as decoded (used by the headless-browser test; the page works without it).
NG thumbnails and CAM overlays are recomputed for at most K rows from the summary, which keeps
the file and the memory bounded and makes a resumed run's report cover every row.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .grading import is_finite_number
from .heatmap import data_uri, overlay, thumbnail
from .inspector import Inspector
from .outputs import write_text
from .summary import HIST_BINS, Summary


@dataclass
class RunInfo:
    model_path: str
    model_sha256: str
    model_name: str
    provider: str
    threshold: float
    class_names: list[str]
    good_class: str
    results_path: str
    created: str
    session_images: int = 0
    session_seconds: float = 0.0
    model_variant: str = ""
    threshold_source: str = "model"
    #: the model's own threshold and how export chose it (metadata ``threshold_source``)
    model_threshold: float | None = None
    model_threshold_source: dict[str, Any] = field(default_factory=dict)
    #: the grading rule and where its cut points came from (:func:`.grading.grading_text`); "" = unordered
    grading: str = ""

    @property
    def images_per_s(self) -> float | None:
        return self.session_images / self.session_seconds if self.session_seconds > 0 else None


@dataclass
class Figure:
    path: str
    top_class: str
    defect_prob: float
    top_prob: float
    thumb: str | None = None  # data URI
    heat: str | None = None  # data URI
    note: str | None = None


def build_figures(inspector: Inspector, items: Sequence[dict[str, Any]], threshold: float) -> list[Figure]:
    """Reload each kept NG image and recompute its CAM (a vanished file gets a note instead)."""
    figures = []
    for row in items:
        fig = Figure(row["path"], str(row["top_class"]), float(row["defect_prob"]), float(row["top_prob"]))
        try:
            arr, _ = inspector.load(row["path"])
            outs = inspector.predict(inspector.preprocess([arr]), cam=inspector.has_cam)
            fig.thumb = data_uri(thumbnail(arr))
            if "cam" in outs:
                d = inspector.decide(outs["probs"][0], threshold)
                cam = outs["cam"][0, inspector.class_names.index(d.defect_class)]
                fig.heat = data_uri(thumbnail(overlay(arr, cam)))
            else:
                fig.note = "model has no CAM output"
        except Exception as exc:
            fig.note = f"image not available any more ({type(exc).__name__})"
        figures.append(fig)
    return figures


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d2330;background:#f6f7f9}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 10px}
.sub{color:#5b6475;font-size:13px;margin-bottom:16px;word-break:break-all}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{background:#fff;border-radius:8px;padding:12px 18px;min-width:110px;box-shadow:0 1px 3px #0002}
.card .n{font-size:28px;font-weight:700}.card .t{font-size:12px;color:#5b6475;text-transform:uppercase}
.ok .n{color:#1f8a4c}.ng .n{color:#c62828}.err .n{color:#b26a00}
table.info{border-collapse:collapse;background:#fff;margin-top:14px;font-size:13px}
table.info td{padding:4px 12px;border-bottom:1px solid #eceef2;word-break:break-all}
table.info td:first-child{color:#5b6475;white-space:nowrap}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{background:#fff;margin:0;padding:8px;border-radius:8px;box-shadow:0 1px 3px #0002;width:400px}
figure .imgs{display:flex;gap:6px;min-height:60px}figure img{max-width:192px;max-height:192px;border-radius:4px}
figcaption{font-size:12px;margin-top:6px;word-break:break-all}.p{font-weight:700;color:#c62828}
table.errors{border-collapse:collapse;background:#fff;font-size:12px;width:100%}
table.errors td,table.errors th{padding:4px 8px;border-bottom:1px solid #eceef2;text-align:left;word-break:break-all}
.note{color:#5b6475;font-size:13px}.warn{color:#b26a00;font-weight:600;font-size:14px}
"""

_MARK_DECODED = (
    "window.addEventListener('load',function(){var n=0;"
    "document.querySelectorAll('img').forEach(function(i){var ok=i.complete&&i.naturalWidth>0;"
    "i.setAttribute('data-decoded',ok?'1':'0');if(ok)n++;});"
    "document.body.setAttribute('data-images-decoded',String(n));});"
)


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def histogram_svg(summary: Summary, threshold: float, width: int = 640, height: int = 220) -> str:
    """Stacked OK/NG bars of P(defect) in HIST_BINS bins, with the threshold as a dashed line."""
    left, bottom, top, right = 44, 30, 10, 10
    pw, ph = width - left - right, height - top - bottom
    peak = max([a + b for a, b in zip(summary.hist_ok, summary.hist_ng)] + [1])
    bw = pw / HIST_BINS
    parts = [
        f'<svg id="histogram" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="histogram of defect probability">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
    ]
    for i, (n_ok, n_ng) in enumerate(zip(summary.hist_ok, summary.hist_ng)):
        x = left + i * bw + 1
        h_ok, h_ng = ph * n_ok / peak, ph * n_ng / peak
        y_ok = top + ph - h_ok
        if n_ok:
            parts.append(
                f'<rect class="bar-ok" x="{x:.1f}" y="{y_ok:.1f}" width="{bw - 2:.1f}" height="{h_ok:.1f}" '
                f'fill="#2e9d5b"><title>{n_ok} OK</title></rect>'
            )
        if n_ng:
            parts.append(
                f'<rect class="bar-ng" x="{x:.1f}" y="{y_ok - h_ng:.1f}" width="{bw - 2:.1f}" '
                f'height="{h_ng:.1f}" fill="#d64545"><title>{n_ng} NG</title></rect>'
            )
    axis_y = top + ph
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + pw}" y2="{axis_y}" stroke="#333"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{axis_y}" stroke="#333"/>')
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + t * pw
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 16}" font-size="11" text-anchor="middle">{t:g}</text>')
    parts.append(f'<text x="{left - 6}" y="{top + 10}" font-size="11" text-anchor="end">{peak}</text>')
    parts.append(f'<text x="{left - 6}" y="{axis_y}" font-size="11" text-anchor="end">0</text>')
    tx = left + threshold * pw
    parts.append(
        f'<line x1="{tx:.1f}" y1="{top}" x2="{tx:.1f}" y2="{axis_y}" stroke="#222" stroke-dasharray="4 3"/>'
        f'<text x="{tx + 4:.1f}" y="{top + 12}" font-size="11">threshold {threshold:g}</text>'
    )
    parts.append(
        f'<text x="{left + pw / 2:.1f}" y="{height - 2}" font-size="11" text-anchor="middle">'
        "P(defect) = 1 - P(good)</text></svg>"
    )
    return "".join(parts)


def _pct(v: Any) -> str:
    """A share from the model file's threshold_source, which is display-only: anything else is n/a."""
    return f"{100 * float(v):.1f} %" if is_finite_number(v) else "n/a"


def _num(v: Any) -> str:
    return f"{float(v):.4g}" if is_finite_number(v) else "n/a"


def threshold_source_text(source: dict[str, Any]) -> str:
    """How the model's threshold was earned, in one line (metadata ``threshold_source``)."""
    if not source:
        return "not recorded (exported before defectscope recorded it)"
    if source.get("method") != "recall target":
        return "set by hand at export (--threshold), not checked against a recall target"
    return (
        f"chosen on this {source.get('variant', '?')} graph for defect recall ≥ {_pct(source.get('target_recall'))}: "
        f"recall {_pct(source.get('recall'))} of {source.get('n_defect')} defect images, false-reject rate "
        f"{_pct(source.get('false_reject_rate'))} of {source.get('n_good')} good images ({source.get('images', '?')})"
    )


def tradeoff_html(source: dict[str, Any]) -> str:
    """The warning and the recall/false-reject trade-off when the recall target costs too many good parts."""
    rows = source.get("tradeoff") if source.get("too_costly") else None
    if not isinstance(rows, list):
        return ""
    cells = "".join(
        f"<tr><td>{_pct(r.get('target_recall'))}</td><td>{_num(r.get('threshold'))}</td>"
        f"<td>{_pct(r.get('recall'))}</td><td>{_pct(r.get('false_reject_rate'))}</td></tr>"
        for r in rows
        if isinstance(r, dict)
    )
    return (
        f'<p class="warn" id="threshold-warning">Warning: this threshold rejects {_pct(source.get("false_reject_rate"))} '
        f"of good validation images, above the {_pct(source.get('warn_false_reject_rate'))} a line is warned at. "
        "Trade-off on the validation images:</p>"
        '<table class="errors" id="tradeoff"><tr><th>target recall</th><th>threshold</th><th>recall</th>'
        f"<th>false-reject rate</th></tr>{cells}</table>"
    )


def _threshold_rows(info: RunInfo) -> list[tuple[str, str]]:
    rows = [
        ("threshold", f"{info.threshold:g} from the {info.threshold_source} (NG when P(defect) ≥ threshold)")
    ]
    if info.model_threshold is not None:
        how = threshold_source_text(info.model_threshold_source)
        rows.append(("model's threshold", f"{info.model_threshold:g}, {how}"))
    return rows


def render_html(summary: Summary, info: RunInfo, figures: Sequence[Figure]) -> str:
    ips = info.images_per_s
    rows = [
        ("model", f"{info.model_name} — {info.model_path}"),
        *([("variant", info.model_variant)] if info.model_variant else []),
        ("model sha256", info.model_sha256),
        ("provider", info.provider),
        *_threshold_rows(info),
        ("classes", ", ".join(info.class_names) + f" (good: {info.good_class})"),
        *([("grading", info.grading)] if info.grading else []),
        (
            "throughput",
            f"{ips:.1f} images/s over {info.session_images} images this session" if ips else "n/a",
        ),
        ("mean latency", f"{summary.mean_latency_ms:.1f} ms per image"),
        ("results", info.results_path),
    ]
    if summary.error_kinds:
        rows.append(("error kinds", ", ".join(f"{k}: {n}" for k, n in summary.error_kinds.most_common())))
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>defectscope report — {_e(info.model_name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>defectscope inspection report</h1>",
        f'<div class="sub">{_e(info.created)} · {_e(info.results_path)}</div>',
        '<div class="cards">',
        f'<div class="card"><div class="n" id="count-total">{summary.total}</div><div class="t">inputs</div></div>',
        f'<div class="card ok"><div class="n" id="count-ok">{summary.ok}</div><div class="t">OK</div></div>',
        f'<div class="card ng"><div class="n" id="count-ng">{summary.ng}</div><div class="t">NG</div></div>',
        f'<div class="card err"><div class="n" id="count-error">{summary.error}</div><div class="t">errors</div></div>',
        "</div>",
        '<table class="info">'
        + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
        + "</table>",
        tradeoff_html(info.model_threshold_source),
        f'<h2 id="ng">NG items ({summary.ng})</h2>',
    ]
    if summary.ng > len(figures):
        out.append(
            f'<p class="note">Showing the {len(figures)} NG items with the highest P(defect); '
            f"all {summary.ng} are in the results file.</p>"
        )
    out.append('<div class="grid" id="ng-items">')
    for f in figures:
        imgs = ""
        if f.thumb:
            imgs += f'<img class="thumb" alt="image" src="{f.thumb}">'
        if f.heat:
            imgs += f'<img class="heat" alt="CAM overlay" src="{f.heat}">'
        note = f'<div class="note">{_e(f.note)}</div>' if f.note else ""
        out.append(
            f'<figure class="ng-item"><div class="imgs">{imgs}</div><figcaption>'
            f'<span class="p">P(defect) {f.defect_prob:.3f}</span> · most likely {_e(f.top_class)} '
            f"({f.top_prob:.3f})<br>"
            f"{_e(f.path)}{note}</figcaption></figure>"
        )
    out.append("</div>")
    out.append(f'<h2 id="errors">Errors ({summary.error})</h2>')
    if summary.errors:
        if summary.error > len(summary.errors):
            out.append(f'<p class="note">Showing the first {len(summary.errors)} of {summary.error}.</p>')
        out.append('<table class="errors" id="error-items"><tr><th>file</th><th>reason</th></tr>')
        out += [
            f'<tr class="error-item"><td>{_e(e["path"])}</td><td>{_e(e["error"])}</td></tr>'
            for e in summary.errors
        ]
        out.append("</table>")
    else:
        out.append('<p class="note">No input failed.</p>')
    out.append('<h2 id="hist">Score histogram</h2>')
    out.append(histogram_svg(summary, info.threshold))
    out.append(f"<script>{_MARK_DECODED}</script></body></html>")
    return "\n".join(out)


def write_report(path: str | os.PathLike[str], text: str) -> Path:
    """Replace the report at once (a special file such as /dev/stdout is written directly)."""
    return write_text(path, text, "--report")
