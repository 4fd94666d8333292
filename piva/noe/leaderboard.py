"""Leaderboards from stored results: markdown and a static HTML page (thumbnails, a CLIP-vs-LPIPS plot).

On the Noe manifest, the paper's own numbers are shown as a reference row labelled
"reported" (they come from the paper's table 2, not from this machine); other
manifests (the toy Noe, a user's objects) are not comparable with them and get none.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from pathlib import Path
from typing import Optional

from piva.io import atomic_path, atomic_write_text

REPORTED = {  # PiVa paper, table 2 (Noe, threestudio, CLIP ViT-B/32, LPIPS AlexNet)
    "dds": {"clip_score": 0.242, "lpips": 0.1918},
    "piva": {"clip_score": 0.245, "lpips": 0.1133},
}
COLUMNS = [  # (key, header, higher is better)
    ("clip_score", "CLIP ↑", True), ("clip_direction", "CLIP dir ↑", True), ("clip_consistency", "consistency ↑", True),
    ("judge_score", "judge ↑", True), ("judge_direction", "judge dir ↑", True), ("judge_consistency", "judge cons ↑", True),
    ("toy_judge_success_rate", "success ↑", True), ("toy_background_psnr_vs_original", "bg PSNR ↑", True),
    ("toy_silhouette_iou_vs_source_geometry", "IoU src", True), ("toy_silhouette_iou_vs_target_geometry", "IoU tgt", True),
    ("toy_silhouette_iou_vs_original", "IoU orig", True),
    ("lpips", "LPIPS ↓", False), ("psnr", "PSNR ↑", True), ("ssim", "SSIM ↑", True),
    ("wall_time_s", "time s", False), ("peak_mb", "peak MB", False),
]
# Toy world only: success = share of views the judge captions as the target (among every toy caption);
# bg PSNR = against the original outside the exact source and target silhouettes; IoU src/tgt = silhouette vs the
# exact shapes; IoU orig = vs the original scene's own silhouette (what the edit changed).
PAIRED = ("toy_background_psnr_vs_original", "psnr", "ssim", "toy_judge_success_rate", "judge_score", "clip_score", "lpips")
SUCCESS = 0.7
"""A toy edit counts as a success for the paired comparison when the judge names the target in this share of views."""


def load_results(out: Path) -> list[dict]:
    rows = []
    for path in sorted((Path(out) / "results").glob("*/*.json")):
        r = json.loads(path.read_text())
        flat = {k: v for k, v in r["metrics"].items() if isinstance(v, (int, float))}
        flat.update({f"toy_{k}": v for k, v in (r["metrics"].get("toy") or {}).items() if isinstance(v, (int, float))})
        flat.update(wall_time_s=r["wall_time_s"],
                    peak_mb=r["peak_memory"].get("gpu_peak_mb", r["peak_memory"].get("process_peak_rss_mb")))
        rows.append({"method": r["method"], "seed": r.get("seed", 0), "type": r["edit"]["type"], "edit": r["edit"],
                     "values": flat,
                     "thumbnail": f"results/{r['method']}/{r['thumbnail']}", "models": r["metrics"].get("models", {}),
                     "unavailable": r["metrics"].get("unavailable", {}), "preset": r.get("preset"),
                     "reconstruction": r["metrics"].get("reconstruction")})
    return rows


def aggregate(rows: list[dict], by: tuple[str, ...]) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    table = {}
    for key, items in sorted(groups.items()):
        means = {}
        for col, _, _ in COLUMNS:
            vals = [i["values"][col] for i in items if col in i["values"] and i["values"][col] is not None
                    and not (isinstance(i["values"][col], float) and math.isnan(i["values"][col]))]
            if vals:
                means[col] = statistics.fmean(vals)
        table[key] = {"n": len(items), **means}
    return table


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "–"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"


def _columns(tables: list[dict]) -> list[tuple]:
    present = {c for t in tables for row in t.values() for c in row}
    return [c for c in COLUMNS if c[0] in present]


def markdown(rows: list[dict], manifest_name: str, reported: bool = False) -> str:
    """`reported`: add the paper's Noe rows (only comparable on the Noe manifest itself)."""
    by_method = aggregate(rows, ("method",))
    by_type = aggregate(rows, ("method", "type"))
    cols = _columns([by_method, by_type] + ([{("reported",): r for r in REPORTED.values()}] if reported else []))
    models = {k: v for r in rows for k, v in r["models"].items()}
    missing = {k: v for r in rows for k, v in r["unavailable"].items()}
    lines = [f"# {manifest_name}: leaderboard", ""]
    lines += ["Models: " + ("; ".join(f"{k}: {v}" for k, v in sorted(models.items())) or "none")]
    lines += [f"Not computed: {k} ({v})" for k, v in sorted(missing.items())]
    lines += ["", "## Per method", "", "| method | edits | " + " | ".join(h for _, h, _ in cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    for (method,), row in by_method.items():
        lines.append(f"| {method} | {row['n']} | " + " | ".join(_fmt(row.get(c)) for c, _, _ in cols) + " |")
    for method, row in REPORTED.items() if reported else ():
        lines.append(f"| {method} (reported, paper table 2) | 112 | " + " | ".join(_fmt(row.get(c)) for c, _, _ in cols) + " |")
    lines += ["", "## Per method and edit type", "", "| method | type | edits | " + " | ".join(h for _, h, _ in cols) + " |",
              "|---|---|---|" + "---|" * len(cols)]
    for (method, kind), row in by_type.items():
        lines.append(f"| {method} | {kind} | {row['n']} | " + " | ".join(_fmt(row.get(c)) for c, _, _ in cols) + " |")
    lines += _paired_lines(rows)
    recon = reconstructions(rows)
    if recon:
        lines += ["", "## Source scenes (no-edit): reconstruction vs the prepared views, held-out views", "",
                  "A poor reconstruction, not the edit, limits every figure of that object.", "",
                  "| object | views | PSNR ↑ | SSIM ↑ | LPIPS ↓ |", "|---|---|---|---|---|"]
        lines += [f"| {o} | {r['views']} | {_fmt(r['psnr'])} | {_fmt(r['ssim'])} | {_fmt(r.get('lpips'))} |"
                  for o, r in recon.items()]
    return "\n".join(lines) + "\n"


def paired(rows: list[dict], a: str = "piva", b: str = "dds", resamples: int = 2000) -> list[dict]:
    """`a` minus `b` on the same edits (same seed and cameras), per figure: the mean difference and a
    percentile-bootstrap 95 % interval over edits (None below 3 pairs); on all shared edits, and on those that
    both methods got right (toy success >= SUCCESS), where preservation is compared at equal success."""
    import numpy as np
    from scipy.stats import bootstrap

    by = {(r["method"], (r["edit"]["id"], r.get("seed", 0))): r["values"] for r in rows}  # an edit: (id, seed)
    shared = sorted(e for m, e in by if m == a and (b, e) in by)
    both_right = [e for e in shared if min(by[(a, e)].get("toy_judge_success_rate", -1),
                                           by[(b, e)].get("toy_judge_success_rate", -1)) >= SUCCESS]
    out = []
    for subset, edits in (("all shared edits", shared), (f"both succeed (success >= {SUCCESS:.0%})", both_right)):
        for key in PAIRED:
            d = [by[(a, e)][key] - by[(b, e)][key] for e in edits if key in by[(a, e)] and key in by[(b, e)]]
            d = [x for x in d if math.isfinite(x)]
            if not d:
                continue
            lo = hi = None
            if len(d) >= 3 and max(d) > min(d):
                ci = bootstrap((np.array(d),), np.mean, confidence_level=0.95, n_resamples=resamples,
                               method="percentile", random_state=0).confidence_interval
                lo, hi = float(ci.low), float(ci.high)
            out.append({"subset": subset, "figure": key, "n": len(d), "mean": statistics.fmean(d), "low": lo, "high": hi})
    return out


def _paired_lines(rows: list[dict]) -> list[str]:
    pairs = paired(rows)
    if not pairs:
        return []
    lines = ["", "## PiVa − DDS on the same edits (paired; 95 % bootstrap interval over edits)", "",
             "| edits | figure | pairs | mean difference | 95 % interval |", "|---|---|---|---|---|"]
    for p in pairs:
        lines.append(f"| {p['subset']} | {p['figure']} | {p['n']} | {_fmt(p['mean'])} | {_interval(p)} |")
    return lines


def _interval(p: dict) -> str:
    return "–" if p["low"] is None else f"[{_fmt(p['low'])}, {_fmt(p['high'])}]"


def reconstructions(rows: list[dict]) -> dict:
    """object id -> the no-edit baseline's reconstruction figures (one per object)."""
    return {r["edit"]["object"]: r["reconstruction"] for r in sorted(rows, key=lambda r: r["edit"]["object"])
            if r["method"] == "no-edit" and r.get("reconstruction")}


def plot(rows: list[dict], path: Path, reported: bool = False) -> Optional[str]:
    """CLIP (or judge) score against LPIPS (or 1 - SSIM where LPIPS is unavailable), one point per edit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = "lpips" if any("lpips" in r["values"] for r in rows) else "ssim"
    y_key = "clip_score" if any("clip_score" in r["values"] for r in rows) else "judge_score"
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=100)
    for method in sorted({r["method"] for r in rows}):
        pts = [(r["values"].get(x_key), r["values"].get(y_key)) for r in rows if r["method"] == method]
        pts = [(x if x_key == "lpips" else 1 - x, y) for x, y in pts if x is not None and y is not None]
        if pts:
            ax.scatter(*zip(*pts), label=method, alpha=0.8)
    if reported and x_key == "lpips" and y_key == "clip_score":
        for method, rep in REPORTED.items():
            ax.scatter([rep["lpips"]], [rep["clip_score"]], marker="*", s=120, label=f"{method} (reported)")
    ax.set_xlabel("LPIPS to original ↓" if x_key == "lpips" else "1 − SSIM to original ↓")
    ax.set_ylabel("CLIP score ↑" if y_key == "clip_score" else "toy judge score ↑ (not CLIP)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # same suffix: matplotlib picks the format from it
        fig.savefig(tmp)
    plt.close(fig)
    return path.name


PAGE_CHECK = """<script>
// Marks the page for headless checks: every image must have loaded.
window.addEventListener('load', () => {
  const bad = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src'));
  document.body.dataset.status = bad.length ? 'broken images: ' + bad.join(', ') : 'ok ' + document.images.length + ' images';
});
</script>"""


def html_page(rows: list[dict], manifest_name: str, plot_file: Optional[str], reported: bool = False) -> str:
    by_method = aggregate(rows, ("method",))
    by_type = aggregate(rows, ("method", "type"))
    cols = _columns([by_method, by_type])
    e = html.escape

    def table(agg: dict, keys: list[str], paper_rows: bool) -> str:
        head = "".join(f"<th>{e(k)}</th>" for k in keys) + "<th>edits</th>" + "".join(f"<th>{e(h)}</th>" for _, h, _ in cols)
        body = []
        for key, row in agg.items():
            body.append("<tr>" + "".join(f"<td>{e(str(k))}</td>" for k in key) + f"<td>{row['n']}</td>"
                        + "".join(f"<td>{_fmt(row.get(c))}</td>" for c, _, _ in cols) + "</tr>")
        if paper_rows:
            for method, row in REPORTED.items():
                body.append(f"<tr class='reported'><td>{method} (reported, paper)</td><td>112</td>"
                            + "".join(f"<td>{_fmt(row.get(c))}</td>" for c, _, _ in cols) + "</tr>")
        return f"<table><tr>{head}</tr>{''.join(body)}</table>"

    pairs = paired(rows)
    paired_table = "" if not pairs else (
        "<h2>PiVa − DDS on the same edits (paired; 95 % bootstrap interval over edits)</h2>"
        "<table><tr><th>edits</th><th>figure</th><th>pairs</th><th>mean difference</th><th>95 % interval</th></tr>"
        + "".join(f"<tr><td>{e(p['subset'])}</td><td>{e(p['figure'])}</td><td>{p['n']}</td><td>{_fmt(p['mean'])}</td>"
                  f"<td>{_interval(p)}</td></tr>"
                  for p in pairs) + "</table>")
    recon = reconstructions(rows)
    recon_table = "" if not recon else (
        "<h2>Source scenes (no-edit): reconstruction vs the prepared views, held-out views</h2>"
        "<table><tr><th>object</th><th>views</th><th>PSNR ↑</th><th>SSIM ↑</th><th>LPIPS ↓</th></tr>"
        + "".join(f"<tr><td>{e(o)}</td><td>{r['views']}</td><td>{_fmt(r['psnr'])}</td><td>{_fmt(r['ssim'])}</td>"
                  f"<td>{_fmt(r.get('lpips'))}</td></tr>" for o, r in recon.items()) + "</table>")
    cards = []
    for r in sorted(rows, key=lambda r: (r["edit"]["id"], r.get("seed", 0), r["method"])):
        v = r["values"]
        score = v.get("clip_score", v.get("judge_score"))
        seed = f", seed {r['seed']}" if r.get("seed") else ""
        cards.append(
            f"<figure><img src='{e(r['thumbnail'])}' alt='{e(r['edit']['id'])} {e(r['method'])}'>"
            f"<figcaption><b>{e(r['method'])}</b> · {e(r['edit']['id'])} ({e(r['type'])}){seed}<br>"
            f"{e(r['edit']['source_prompt'])} → {e(r['edit']['target_prompt'])}<br>"
            f"score {_fmt(score)} · PSNR {_fmt(v.get('psnr'))} · LPIPS {_fmt(v.get('lpips'))}</figcaption></figure>"
        )
    models = {k: v for r in rows for k, v in r["models"].items()}
    missing = {k: v for r in rows for k, v in r["unavailable"].items()}
    notes = "".join(f"<li>{e(k)}: {e(v)}</li>" for k, v in sorted(models.items()))
    notes += "".join(f"<li>not computed — {e(k)}: {e(v)}</li>" for k, v in sorted(missing.items()))
    img = f"<img class='plot' src='{e(plot_file)}' alt='score vs preservation'>" if plot_file else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(manifest_name)} leaderboard</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
tr.reported {{ color: #777; font-style: italic; }}
figure {{ display: inline-block; margin: 8px; width: 400px; vertical-align: top; }}
figure img {{ width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }}
figcaption {{ font-size: 12px; }}
img.plot {{ max-width: 520px; }}
</style></head>
<body>
<h1>{e(manifest_name)} leaderboard</h1>
<ul>{notes}</ul>
<h2>Per method</h2>{table(by_method, ['method'], reported)}
<h2>Per method and edit type</h2>{table(by_type, ['method', 'type'], False)}
{paired_table}
{recon_table}
{img}
<h2>Edits (top: original, bottom: edited)</h2>
{''.join(cards)}
{PAGE_CHECK}
</body></html>
"""


def write_leaderboards(out: Path, manifest_name: str = "noe", reported: bool = False) -> dict:
    """leaderboard.md/.html of every stored result; `reported` adds the paper's rows (the Noe manifest only)."""
    out = Path(out)
    rows = load_results(out)
    md, page = out / "leaderboard.md", out / "leaderboard.html"
    plot_file = plot(rows, out / "leaderboard_plot.png", reported) if rows else None
    atomic_write_text(md, markdown(rows, manifest_name, reported))
    atomic_write_text(page, html_page(rows, manifest_name, plot_file, reported))
    return {"markdown": str(md), "html": str(page), "results": len(rows)}
