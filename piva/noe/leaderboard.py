"""Leaderboards from stored results: markdown and a static HTML page (thumbnails, a CLIP-vs-LPIPS plot).

A manifest may carry a paper's own figures for exactly its edits (its `reported` block: Noe's from the PiVa
paper's table 2, in2n's from table 3); they are shown as reference rows labelled "reported" (not made on this
machine). Other manifests (the toy Noe, a user's objects) are not comparable with any and get none.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from piva.io import atomic_path, atomic_write_text
from piva.noe.validate import DEFAULT_MANIFEST, edit_type

if TYPE_CHECKING:
    import numpy as np

NOE_MANIFEST = Path(__file__).resolve().parents[2] / DEFAULT_MANIFEST
"""The checkout's Noe manifest: where `reported=True` (a caller without a manifest) takes Noe's reported rows."""
COLUMNS = [  # (key, header, higher is better)
    ("clip_score", "CLIP ↑", True), ("clip_direction", "CLIP dir ↑", True), ("clip_consistency", "consistency ↑", True),
    ("judge_score", "judge ↑", True), ("judge_direction", "judge dir ↑", True), ("judge_consistency", "judge cons ↑", True),
    ("toy_judge_success_rate", "success ↑", True), ("toy_background_psnr_vs_original", "bg PSNR ↑", True),
    ("toy_silhouette_iou_vs_source_geometry", "IoU src", True), ("toy_silhouette_iou_vs_target_geometry", "IoU tgt", True),
    ("toy_silhouette_iou_vs_original", "IoU orig", True),
    ("lpips", "LPIPS ↓", False), ("psnr", "PSNR ↑", True), ("ssim", "SSIM ↑", True),
    ("photo_lpips", "LPIPS photos ↓", False), ("photo_psnr", "PSNR photos ↑", True),
    ("identity_same_person", "same person ↑", True), ("identity_distance", "face dist ↓", False),
    ("wall_time_s", "time s", False), ("peak_mb", "peak MB", False),
]
# Toy world only: success = share of views the judge captions as the target (among every toy caption);
# bg PSNR = against the original outside the exact source and target silhouettes; IoU src/tgt = silhouette vs the
# exact shapes; IoU orig = vs the original scene's own silhouette (what the edit changed).
# Captures: LPIPS/PSNR photos = against the held-out photographs (Instruct-NeRF2NeRF's protocol; the plain columns
# are against the original scene's renders); same person / face dist = dlib face descriptors (people only).
PAIRED = ("toy_background_psnr_vs_original", "psnr", "ssim", "toy_judge_success_rate", "judge_score", "clip_score", "lpips")
PAIRED_BY_TYPE = ("toy_background_psnr_vs_original", "toy_judge_success_rate")
PAIRED_HEADING = "PiVa − DDS (and − SDS; splats − NeRF) on the same edits (paired; 95 % bootstrap interval over edits)"
SUCCESS = 0.7
"""A toy edit counts as a success for the paired comparison when the judge names the target in this share of views."""


def reported_rows(manifest: Optional[dict]) -> Optional[dict]:
    """The manifest's `reported` block with the number of edits its rows cover (all the manifest's edits), or
    None: reported figures are shown only beside results of the manifest they were measured on."""
    block = (manifest or {}).get("reported")
    if not block or not block.get("rows"):
        return None
    return {**block, "edits": len(manifest.get("edits", []))}


Reported = Union[bool, dict, None]
"""What a leaderboard shows as reported rows: `reported_rows(manifest)`, None/False for none, or True for the
Noe manifest's (a caller that has no manifest at hand)."""


def resolve_reported(reported: Reported) -> Optional[dict]:
    """`reported` as a `reported_rows` block (True: the checkout's Noe manifest's), or None."""
    if reported is True:
        if not NOE_MANIFEST.is_file():
            raise FileNotFoundError(f"reported=True reads Noe's reported rows from {NOE_MANIFEST}, which is missing: "
                                    "pass reported_rows(manifest) instead")
        return reported_rows(json.loads(NOE_MANIFEST.read_text()))
    return reported or None


def _reported_label(method: str, block: dict) -> str:
    return f"{method} (reported, {block['source']})"


def _fmt_reported(v: Optional[float]) -> str:
    """A paper's figure as printed there (PSNR with two decimals), else as ours are."""
    return f"{v:.2f}" if v is not None and abs(v) >= 10 else _fmt(v)


def run_settings(out: Path) -> dict:
    """What the results in `out` were made with (OUT/benchmark.json, written by the runner), or {}."""
    path = Path(out) / "benchmark.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def other_settings(result: dict, settings: dict) -> Optional[str]:
    """Why a stored result does not belong with the folder's settings (None: it does), so a leaderboard never
    mixes results made with another backend, preset or step count."""
    made = result.get("provenance") or {k: result.get(k) for k in ("backend", "preset", "edit_steps")}
    for key in ("backend", "preset", "edit_steps", "source_steps", "eval_views"):
        if key not in settings or made.get(key) is None:
            continue
        if key == "edit_steps" and result.get("method") == "no-edit":
            continue
        if made[key] != settings[key]:
            return f"{key} {made[key]!r}"
    return None


def load_results(out: Path, left_out: Optional[list] = None) -> list[dict]:
    """The stored results made with the folder's settings; the others go to `left_out` (path, why)."""
    rows = []
    settings = run_settings(out)
    for path in sorted((Path(out) / "results").glob("*/*.json")):
        r = json.loads(path.read_text())
        why = other_settings(r, settings)
        if why:
            if left_out is not None:
                left_out.append((str(path.relative_to(out)), why))
            continue
        flat = {k: v for k, v in r["metrics"].items() if isinstance(v, (int, float))}
        flat.update({f"toy_{k}": v for k, v in (r["metrics"].get("toy") or {}).items() if isinstance(v, (int, float))})
        flat.update({f"photo_{k}": v for k, v in (r["metrics"].get("against_photos") or {}).items()
                     if k in ("psnr", "lpips", "ssim")})
        flat.update(wall_time_s=r["wall_time_s"],
                    peak_mb=r["peak_memory"].get("gpu_peak_mb", r["peak_memory"].get("process_peak_rss_mb")))
        edit = {**r["edit"], "type": edit_type(r["edit"]["type"])}  # results stored under an older type name
        rows.append({"method": r["method"], "seed": r.get("seed", 0), "type": edit["type"], "edit": edit,
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
        # Rows over different seeds are different draws: the seeds column says which (the paired tables match them).
        table[key] = {"n": len(items), "seeds": ",".join(str(x) for x in sorted({i.get("seed", 0) for i in items})), **means}
    return table


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "–"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"


def _columns(tables: list[dict]) -> list[tuple]:
    present = {c for t in tables for row in t.values() for c in row}
    return [c for c in COLUMNS if c[0] in present]


def markdown(rows: list[dict], manifest_name: str, reported: Reported = None, grid_file: Optional[str] = None,
             settings: Optional[dict] = None, failed: Optional[dict] = None, left_out: Optional[list] = None) -> str:
    """`reported`: the manifest's reported rows (`reported_rows`; only comparable on that manifest itself);
    `settings`, what the results were made with; `failed`, edits that could not run (why); `left_out`, results
    made otherwise."""
    by_method = aggregate(rows, ("method",))
    by_type = aggregate(rows, ("method", "type"))
    paper = resolve_reported(reported)
    cols = _columns([by_method, by_type] + ([{(m,): r for m, r in paper["rows"].items()}] if paper else []))
    models = {k: v for r in rows for k, v in r["models"].items()}
    missing = {k: v for r in rows for k, v in r["unavailable"].items()}
    lines = [f"# {manifest_name}: leaderboard", ""]
    if settings:
        lines += ["Made with: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items()), ""]
    lines += ["Models: " + ("; ".join(f"{k}: {v}" for k, v in sorted(models.items())) or "none")]
    lines += [f"Not computed: {k} ({v})" for k, v in sorted(missing.items())]
    lines += ["", "## Per method", "", "| method | edits | seeds | " + " | ".join(h for _, h, _ in cols) + " |",
              "|---|---|---|" + "---|" * len(cols)]
    for (method,), row in by_method.items():
        lines.append(f"| {method} | {row['n']} | {row['seeds']} | " + " | ".join(_fmt(row.get(c)) for c, _, _ in cols) + " |")
    for method, row in paper["rows"].items() if paper else ():
        lines.append(f"| {_reported_label(method, paper)} | {paper['edits']} | – | "
                     + " | ".join(_fmt_reported(row.get(c)) for c, _, _ in cols) + " |")
    if paper and paper.get("protocol"):
        lines += ["", f"Reported rows ({paper['source']}, not measured here): {paper['protocol']}"]
    lines += ["", "## Per method and edit type", "",
              "| method | type | edits | seeds | " + " | ".join(h for _, h, _ in cols) + " |",
              "|---|---|---|---|" + "---|" * len(cols)]
    for (method, kind), row in by_type.items():
        lines.append(f"| {method} | {kind} | {row['n']} | {row['seeds']} | "
                     + " | ".join(_fmt(row.get(c)) for c, _, _ in cols) + " |")
    lines += _paired_lines(rows)
    recon = reconstructions(rows)
    if recon:
        lines += ["", "## Source scenes (no-edit): reconstruction vs the prepared views, held-out views", "",
                  "A poor reconstruction, not the edit, limits every figure of that object.", "",
                  "| object | views | PSNR ↑ | SSIM ↑ | LPIPS ↓ |", "|---|---|---|---|---|"]
        lines += [f"| {o} | {r['views']} | {_fmt(r['psnr'])} | {_fmt(r['ssim'])} | {_fmt(r.get('lpips'))} |"
                  for o, r in recon.items()]
    if grid_file:
        lines += ["", "## Every edit: the original, then each method (two views each)", "", f"![every edit]({grid_file})"]
    if failed:
        lines += ["", f"## Edits that did not run ({len(failed)}; run the same command again to retry them)", "",
                  "| edit | why |", "|---|---|"]
        lines += [f"| {k} | {str(v.get('why', v) if isinstance(v, dict) else v).replace('|', '/')} |"
                  for k, v in sorted(failed.items())]
    if left_out:
        lines += ["", f"## Left out: {len(left_out)} stored result(s) made with other settings", ""]
        lines += [f"* {p}: {why}" for p, why in left_out]
    return "\n".join(lines) + "\n"


def paired(rows: list[dict], a: str = "piva", b: str = "dds", resamples: int = 2000,
           ratios: tuple[str, ...] = ()) -> list[dict]:
    """`a` minus `b` on the same edits (same seed and cameras), per figure: the mean difference and a
    percentile-bootstrap 95 % interval over edits (None below 3 pairs); on all shared edits, and on those that
    both methods got right (toy success >= SUCCESS), where preservation is compared at equal success.
    `ratios`: figures compared as a / b per edit instead (figure "KEY ratio"), e.g. the time of a splat edit
    against the NeRF edit of the same scene."""
    by = {(r["method"], (r["edit"]["id"], r.get("seed", 0))): r["values"] for r in rows}  # an edit: (id, seed)
    shared = sorted(e for m, e in by if m == a and (b, e) in by)
    both_right = [e for e in shared if min(by[(a, e)].get("toy_judge_success_rate", -1),
                                           by[(b, e)].get("toy_judge_success_rate", -1)) >= SUCCESS]
    types = {e: r["type"] for r in rows for e in [(r["edit"]["id"], r.get("seed", 0))]}
    subsets = [("all shared edits", shared, PAIRED), (f"both succeed (success >= {SUCCESS:.0%})", both_right, PAIRED)]
    # per edit type, the two figures the claim is about: does the identity term keep more at equal success?
    subsets += [(f"{kind}, both succeed", [e for e in both_right if types[e] == kind], PAIRED_BY_TYPE)
                for kind in sorted({types[e] for e in shared})]
    out = []
    for subset, edits, keys in subsets:
        for key in keys:
            d = [by[(a, e)][key] - by[(b, e)][key] for e in edits if key in by[(a, e)] and key in by[(b, e)]]
            d = [x for x in d if math.isfinite(x)]
            if not d:
                continue
            lo, hi = _bootstrap(d, resamples)
            out.append({"method": f"{a} − {b}", "subset": subset, "figure": key, "n": len(d), "mean": statistics.fmean(d),
                        "low": lo, "high": hi})
        if subset.startswith("all") or subset.startswith("both"):
            for key in ratios:
                d = [by[(a, e)][key] / by[(b, e)][key] for e in edits
                     if by[(a, e)].get(key) is not None and by[(b, e)].get(key)]  # resumed edits have no time
                if d:
                    lo, hi = _bootstrap(d, resamples)
                    out.append({"method": f"{a} / {b}", "subset": subset, "figure": f"{key} ratio", "n": len(d),
                                "mean": statistics.fmean(d), "low": lo, "high": hi})
    return out


def _bootstrap(d: list[float], resamples: int) -> tuple[Optional[float], Optional[float]]:
    import numpy as np
    from scipy.stats import bootstrap

    if len(d) < 3 or max(d) == min(d):
        return None, None
    ci = bootstrap((np.array(d),), np.mean, confidence_level=0.95, n_resamples=resamples, method="percentile",
                   random_state=0).confidence_interval
    return float(ci.low), float(ci.high)


def paired_with_dds(rows: list[dict]) -> list[dict]:
    """`paired` for PiVa against DDS (then SDS), and for each sweep variant (METHOD+KNOB=VALUE) against DDS and
    PiVa against it (with the time ratio): e.g. dds+same_latent=true isolates the identity term from the shared latent. Splat methods:
    piva-splat against dds-splat, and each against its NeRF method on the same edits, with their time ratio."""
    variants = sorted({r["method"] for r in rows if "+" in r["method"]})
    pairs = [("piva", "dds"), ("piva", "sds")] + [(v, "dds") for v in variants] + [("piva-splat", "dds-splat")]
    found = [p for a, b in pairs for p in paired(rows, a, b)]
    # a variant against the method it changes, with its time: what a cheaper setting costs and saves
    found += [p for v in variants for p in paired(rows, "piva", v, ratios=("wall_time_s",))]
    return found + [p for a, b in (("piva-splat", "piva"), ("dds-splat", "dds"))
                    for p in paired(rows, a, b, ratios=("wall_time_s",))]


def _paired_lines(rows: list[dict]) -> list[str]:
    pairs = paired_with_dds(rows)
    if not pairs:
        return []
    lines = ["", f"## {PAIRED_HEADING}", "",
             "| difference | edits | figure | pairs | mean difference | 95 % interval |", "|---|---|---|---|---|---|"]
    for p in pairs:
        lines.append(f"| {p['method']} | {p['subset']} | {p['figure']} | {p['n']} | {_fmt(p['mean'])} | {_interval(p)} |")
    return lines


def _interval(p: dict) -> str:
    return "–" if p["low"] is None else f"[{_fmt(p['low'])}, {_fmt(p['high'])}]"


def reconstructions(rows: list[dict]) -> dict:
    """object id -> the no-edit baseline's reconstruction figures (one per object)."""
    return {r["edit"]["object"]: r["reconstruction"] for r in sorted(rows, key=lambda r: r["edit"]["object"])
            if r["method"] == "no-edit" and r.get("reconstruction")}


def plot(rows: list[dict], path: Path, reported: Reported = None) -> Optional[str]:
    """CLIP (or judge) score against LPIPS (or 1 - SSIM where LPIPS is unavailable), one point per edit; the
    reported rows (`reported_rows`) that have both figures as stars."""
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
    paper = resolve_reported(reported)
    if paper and x_key == "lpips" and y_key == "clip_score":
        for method, rep in paper["rows"].items():
            if "lpips" in rep and "clip_score" in rep:
                ax.scatter([rep["lpips"]], [rep["clip_score"]], marker="*", s=120, label=f"{method} (reported)")
    ax.set_xlabel("LPIPS to original ↓" if x_key == "lpips" else "1 − SSIM to original ↓")
    ax.set_ylabel("CLIP score ↑" if y_key == "clip_score" else "toy judge score ↑ (not CLIP)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # same suffix: matplotlib picks the format from it
        fig.savefig(tmp)
    plt.close(fig)
    return path.name


GRID = "leaderboard_grid.png"
GRID_VIEWS = (0, 2)
"""Which of a thumbnail's four views the grid shows (a quarter turn apart on the evaluation orbit)."""


def _method_order(methods: set[str]) -> list[str]:
    first = [m for m in ("piva", "dds", "sds") if m in methods]
    return first + sorted(methods - set(first) - {"no-edit"})


def comparison_grid(rows: list[dict], out: Path) -> tuple[Optional["np.ndarray"], list[str], list[str]]:
    """uint8 [H,W,3] image: one row per edit (its lowest seed), the original then each method's edit, GRID_VIEWS of
    each, cut from the stored thumbnails (original above edited, four views); a missing edit is left grey.
    Returns the image, the row labels and the column labels."""
    import imageio.v3 as iio
    import numpy as np

    methods = _method_order({r["method"] for r in rows})
    seed = {}
    for r in rows:
        seed[r["edit"]["id"]] = min(seed.get(r["edit"]["id"], r["seed"]), r["seed"])
    chosen = {(r["edit"]["id"], r["method"]): r for r in rows if r["seed"] == seed[r["edit"]["id"]]}
    edits = sorted({e: r["edit"] for (e, _), r in chosen.items()}.values(), key=lambda e: (e["type"], e["id"]))
    if not edits or not methods:
        return None, [], []
    cells, labels = [], []
    size = None
    for edit in edits:
        thumbs = {m: iio.imread(Path(out) / chosen[(edit["id"], m)]["thumbnail"])[..., :3]
                  for m in methods + ["no-edit"] if (edit["id"], m) in chosen}
        any_thumb = next(iter(thumbs.values()))
        h, w = any_thumb.shape[0] // 2, any_thumb.shape[1] // 4
        size = size or (h, w)
        if (h, w) != size:
            raise ValueError(f"thumbnails of different sizes in {out}: rebuild them with --rescore")

        def cut(t, row: int):
            return [t[row * h:(row + 1) * h, v * w:(v + 1) * w] for v in GRID_VIEWS]

        grey = [np.full((h, w, 3), 128, np.uint8)] * len(GRID_VIEWS)
        line = cut(any_thumb, 0) + [im for m in methods for im in (cut(thumbs[m], 1) if m in thumbs else grey)]
        cells.append(np.concatenate(line, axis=1))
        labels.append(f"{edit['type']}: {edit['source_prompt']} → {edit['target_prompt']}"
                      + (f" (seed {seed[edit['id']]})" if seed[edit["id"]] else ""))
    return np.concatenate(cells, axis=0), labels, ["original"] + methods


def grid_figure(rows: list[dict], out: Path) -> Optional[str]:
    """The comparison grid with its labels, as GRID in `out`: what the README shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, labels, columns = comparison_grid(rows, out)
    if image is None:
        return None
    h, w = image.shape[:2]
    row_h, col_w = h / len(labels), w / len(columns)
    dpi, left, top = 100, 0.3 + 0.062 * max(map(len, labels)), 0.3  # inches of label margin (8 pt text)
    fig = plt.figure(figsize=(w / dpi + left, h / dpi + top), dpi=dpi)
    ax = fig.add_axes((left / (w / dpi + left), 0, (w / dpi) / (w / dpi + left), (h / dpi) / (h / dpi + top)))
    ax.imshow(image, interpolation="nearest")
    ax.set_yticks([(i + 0.5) * row_h for i in range(len(labels))], labels, fontsize=8)
    ax.set_xticks([(i + 0.5) * col_w for i in range(len(columns))], columns, fontsize=9)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for i in range(1, len(columns)):
        ax.axvline(i * col_w - 0.5, color="white", lw=2)
    path = Path(out) / GRID
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return path.name


PAGE_CHECK = """<script>
// Marks the page for headless checks: every image must have loaded.
window.addEventListener('load', () => {
  const bad = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src'));
  document.body.dataset.status = bad.length ? 'broken images: ' + bad.join(', ') : 'ok ' + document.images.length + ' images';
});
</script>"""


def html_page(rows: list[dict], manifest_name: str, plot_file: Optional[str], reported: Reported = None,
              grid_file: Optional[str] = None, settings: Optional[dict] = None) -> str:
    by_method = aggregate(rows, ("method",))
    by_type = aggregate(rows, ("method", "type"))
    paper = resolve_reported(reported)
    cols = _columns([by_method, by_type] + ([{(m,): r for m, r in paper["rows"].items()}] if paper else []))
    e = html.escape

    def table(agg: dict, keys: list[str], paper_rows: bool) -> str:
        head = ("".join(f"<th>{e(k)}</th>" for k in keys) + "<th>edits</th><th>seeds</th>"
                + "".join(f"<th>{e(h)}</th>" for _, h, _ in cols))
        body = []
        for key, row in agg.items():
            body.append("<tr>" + "".join(f"<td>{e(str(k))}</td>" for k in key) + f"<td>{row['n']}</td><td>{row['seeds']}</td>"
                        + "".join(f"<td>{_fmt(row.get(c))}</td>" for c, _, _ in cols) + "</tr>")
        if paper_rows and paper:
            for method, row in paper["rows"].items():
                body.append(f"<tr class='reported'><td>{e(_reported_label(method, paper))}</td>"
                            f"<td>{paper['edits']}</td><td>–</td>"
                            + "".join(f"<td>{_fmt_reported(row.get(c))}</td>" for c, _, _ in cols) + "</tr>")
        table_html = f"<table><tr>{head}</tr>{''.join(body)}</table>"
        if paper_rows and paper and paper.get("protocol"):
            table_html += (f"<p class='reported'>Reported rows ({e(paper['source'])}, not measured here): "
                           f"{e(paper['protocol'])}</p>")
        return table_html

    pairs = paired_with_dds(rows)
    paired_table = "" if not pairs else (
        f"<h2>{PAIRED_HEADING}</h2>"
        "<table><tr><th>difference</th><th>edits</th><th>figure</th><th>pairs</th><th>mean difference</th><th>95 % interval</th></tr>"
        + "".join(f"<tr><td>{e(p['method'])}</td><td>{e(p['subset'])}</td><td>{e(p['figure'])}</td><td>{p['n']}</td>"
                  f"<td>{_fmt(p['mean'])}</td>"
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
    made_with = ("<p>Made with: " + e(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items())) + "</p>"
                 if settings else "")
    notes += "".join(f"<li>not computed — {e(k)}: {e(v)}</li>" for k, v in sorted(missing.items()))
    img = f"<img class='plot' src='{e(plot_file)}' alt='score vs preservation'>" if plot_file else ""
    grid = (f"<h2>Every edit: the original, then each method</h2><img class='grid' src='{e(grid_file)}' "
            "alt='every edit, side by side'>") if grid_file else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(manifest_name)} leaderboard</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
tr.reported, p.reported {{ color: #777; font-style: italic; }}
figure {{ display: inline-block; margin: 8px; width: 400px; vertical-align: top; }}
figure img {{ width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }}
figcaption {{ font-size: 12px; }}
img.plot {{ max-width: 520px; }}
img.grid {{ max-width: 100%; image-rendering: pixelated; }}
</style></head>
<body>
<h1>{e(manifest_name)} leaderboard</h1>
{made_with}
<ul>{notes}</ul>
<h2>Per method</h2>{table(by_method, ['method'], reported)}
<h2>Per method and edit type</h2>{table(by_type, ['method', 'type'], False)}
{paired_table}
{recon_table}
{img}
{grid}
<h2>Edits (top: original, bottom: edited)</h2>
{''.join(cards)}
{PAGE_CHECK}
</body></html>
"""


def write_leaderboards(out: Path, manifest_name: str = "noe", reported: Reported = None) -> dict:
    """leaderboard.md/.html of every stored result; `reported` adds a paper's rows for this manifest
    (`reported_rows(manifest)`; True: Noe's, for a caller without the manifest)."""
    out = Path(out)
    reported = resolve_reported(reported)
    left_out: list = []
    rows = load_results(out, left_out)
    failures = out / "failed.json"
    failed = json.loads(failures.read_text()) if failures.is_file() else {}
    md, page = out / "leaderboard.md", out / "leaderboard.html"
    plot_file = plot(rows, out / "leaderboard_plot.png", reported) if rows else None
    grid_file = grid_figure(rows, out) if rows else None
    atomic_write_text(md, markdown(rows, manifest_name, reported, grid_file, run_settings(out), failed, left_out))
    atomic_write_text(page, html_page(rows, manifest_name, plot_file, reported, grid_file, run_settings(out)))
    return {"markdown": str(md), "html": str(page), "results": len(rows)}
