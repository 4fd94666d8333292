"""Rank editing methods on the Noe benchmark (or its toy-world stand-in).

    python benchmark/run.py --toy                                  # CPU, toy world, minutes
    python benchmark/run.py --methods piva,dds --types texturing    # the real Noe (GPU)
    python benchmark/run.py --ray auto                              # one edit per GPU across a Ray cluster
    python benchmark/run.py --toy --methods piva+identity_weight=0  # a sweep: the method with one knob changed

Finished edits are kept in OUT/results/<method>/<edit>.json; run the same command
again after a stop and it carries on where it stopped. After a metric's definition
changes, the same command with --rescore measures the stored edits again from their runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    """The command line (also read by tests/test_readme.py, which parses the README's commands with it)."""
    from piva.noe.presets import PRESETS
    from piva.noe.runner import METHODS, SPLAT_METHODS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, help="default: benchmark/noe/manifest.json (--toy: toy-manifest.json)")
    p.add_argument("--toy", action="store_true", help="the toy-world manifest and preset (CPU, offline)")
    p.add_argument("--out", type=Path, help="results folder (default: outputs/noe or outputs/noe-toy, with the backend "
                                            "and changed step counts in the name, e.g. outputs/noe-toy-threestudio)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, from {','.join(METHODS + SPLAT_METHODS)} (the splat ones on splatfacto scenes); "
                        "METHOD+KNOB=VALUE[+...] changes GuidanceConfig knobs of a method for a sweep, "
                        "stored as its own method (e.g. piva+identity_weight=0)")
    p.add_argument("--objects", help="comma-separated object ids")
    p.add_argument("--types", help="comma-separated: texturing,addition,shape-change (the older name translation is accepted)")
    p.add_argument("--edits", help="comma-separated edit ids (e.g. toy-red-cube-texturing-0)")
    p.add_argument("--limit", type=int, help="at most this many edits (after the filters)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each is its own run of every edit (e.g. 0,1)")
    p.add_argument("--preset", choices=list(PRESETS), help="sizes and devices (default: toy with --toy, else full)")
    p.add_argument("--edit-steps", type=int, help="override the preset's edit steps")
    p.add_argument("--source-steps", type=int, help="override the preset's source-scene steps")
    p.add_argument("--eval-views", type=int, default=120, help="evaluation orbit size (protocol: 120)")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model (ViT-B-32 or ViT-L-14)")
    p.add_argument("--clip-weights", help="local CLIP weights file (default: the Hugging Face cache)")
    p.add_argument("--nerf-synthetic-dir", type=Path, help="folder with the NeRF-synthetic scenes")
    p.add_argument("--objaverse-dir", type=Path, help="folder with <uid>.glb files")
    p.add_argument("--no-download", action="store_true", help="use local data only")
    p.add_argument("--backend", choices=["nerfstudio", "threestudio"], default="nerfstudio")
    p.add_argument("--threestudio", type=Path, help="threestudio checkout (with --backend threestudio)")
    p.add_argument("--ray", metavar="ADDRESS", help="run edits as Ray tasks: 'auto', 'local' or a cluster address")
    p.add_argument("--workers", type=int, default=None,
                   help="edits run at once in local processes, the CPU threads shared out (default: the toy preset "
                        "on CPU, either backend, one per core up to 4, as on 2 cores 2 finish ~1.5x the edits an "
                        "hour; else 1)")
    p.add_argument("--leaderboard-only", action="store_true", help="rebuild the pages from stored results")
    p.add_argument("--rescore", action="store_true",
                   help="measure the stored results again with the current metrics (their runs are rendered again, "
                        "nothing trains; time and memory stay as recorded), then rebuild the pages")
    return p


def main(argv=None) -> int:
    from piva.noe.leaderboard import reported_rows
    from piva.noe.prepare import PrepareOptions
    from piva.noe.runner import (RunOptions, default_out, default_workers, rescore_benchmark, run_benchmark,
                                  select_edits)
    from piva.noe.validate import ManifestError, validate

    a = build_parser().parse_args(argv)

    manifest_path = a.manifest or ROOT / "noe" / ("toy-manifest.json" if a.toy else "manifest.json")
    # Noe's own rules (every type per object, 35/112): the bundled Noe manifest only. A paper's reported rows come
    # from the manifest's own `reported` block (Noe's table 2, in2n's table 3), so they stay with their manifest.
    noe = a.manifest is None and not a.toy
    try:
        manifest = validate(manifest_path, full_benchmark=noe)
    except (ManifestError, FileNotFoundError) as exc:
        print(f"piva: error: {manifest_path}: {exc}", file=sys.stderr)
        return 2
    preset = a.preset or ("toy" if a.toy else "full")
    out = a.out or default_out(preset, a.backend, a.edit_steps, a.source_steps)
    if a.leaderboard_only:
        from piva.noe.leaderboard import write_leaderboards

        print(write_leaderboards(out, manifest.get("name", "noe"), reported=reported_rows(manifest)))
        return 0
    if a.backend == "threestudio":
        from piva.threestudio.backend import check_backend

        check_backend(a.threestudio)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    try:
        seeds = sorted({int(x) for x in split(a.seeds) or ["0"]})
    except ValueError:
        print(f"piva: error: --seeds {a.seeds!r}: give whole numbers separated by commas, e.g. 0,1", file=sys.stderr)
        return 2
    if any(x < 0 for x in seeds):
        print("piva: error: --seeds must be >= 0", file=sys.stderr)
        return 2
    try:
        edits = select_edits(manifest, split(a.objects), split(a.types), a.limit, split(a.edits))
    except ValueError as exc:
        print(f"piva: error: {exc}", file=sys.stderr)
        return 2
    if not edits:
        print("piva: error: no edit matches --objects/--types/--edits", file=sys.stderr)
        return 2
    prep = PrepareOptions(root=out, preset=preset, nerf_synthetic_dir=a.nerf_synthetic_dir,
                          objaverse_dir=a.objaverse_dir, download=not a.no_download, source_steps=a.source_steps)
    opts = RunOptions(out=out, methods=split(a.methods), preset=preset, edit_steps=a.edit_steps,
                      eval_views=a.eval_views, clip_model=a.clip_model, clip_weights=a.clip_weights, prepare=prep,
                      backend=a.backend, threestudio_root=a.threestudio, reported=reported_rows(manifest),
                      seeds=seeds)
    try:
        if a.rescore:
            summary = rescore_benchmark(manifest, edits, opts)
            print(f"[noe] measured again: {summary['rescored']}; leaderboards: {summary['markdown']}")
        else:
            workers = a.workers if a.workers is not None else 1 if a.ray else default_workers(opts)
            summary = run_benchmark(manifest, edits, opts, ray_address=a.ray, workers=workers)
    except ValueError as exc:
        print(f"piva: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[noe] stopped: finished edits are stored; run the same command again to resume", file=sys.stderr)
        return 130
    if summary["failed"]:
        print(f"[noe] {len(summary['failed'])} edit(s) could not run (data missing); see above")
    return 0


if __name__ == "__main__":
    sys.exit(main())
