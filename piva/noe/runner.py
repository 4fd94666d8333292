"""`python benchmark/run.py`: edit every (method, edit) of a Noe manifest, evaluate, and rank.

Every finished edit is written at once (`results/<method>/<edit id>.json`, atomically);
a killed run starts again where it stopped: finished edits are skipped and an
interrupted edit resumes from its latest nerfstudio checkpoint.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from piva.noe.prepare import PrepareOptions, object_dir, prepare_object, NotAvailable

METHODS = ("piva", "dds", "sds", "no-edit")
EDIT_PRESETS = {
    # Noe with threestudio's paper settings lives in configs/threestudio; this is the nerfstudio backend.
    "full": dict(steps=15000, render_short_side=512, lr=1e-3, identity_weight=0.4, rays=4096, small=False,
                 device="cuda", eval_size=512, eval_elevation=15.0, eval_distance=4.0, eval_fov=50.0),
    # The toy world's camera set-up (toy objects are ~1 unit: distance 3.6, fov 40, as they were trained).
    # DDS with the true source latent: the toy prior's shared-latent step overshoots the target (docs/toyworld.md).
    "toy": dict(steps=300, render_short_side=32, lr=1e-3, identity_weight=0.4, rays=256, small=True,
                device="cpu", eval_size=32, eval_elevation=30.0, eval_distance=3.6, eval_fov=40.0, same_latent=False),
}


@dataclass
class RunOptions:
    out: Path
    methods: Sequence[str] = METHODS
    preset: str = "full"
    edit_steps: Optional[int] = None
    eval_views: int = 120
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"
    clip_weights: Optional[str] = None
    prepare: PrepareOptions = field(default=None)  # type: ignore[assignment]
    backend: str = "nerfstudio"
    threestudio_root: Optional[Path] = None

    def setting(self, key: str):
        if key == "steps" and self.edit_steps is not None:
            return self.edit_steps
        return EDIT_PRESETS[self.preset][key]


def select_edits(manifest: dict, objects=None, types=None, limit: Optional[int] = None) -> list[dict]:
    edits = [e for e in manifest["edits"] if (not objects or e["object"] in objects) and (not types or e["type"] in types)]
    return edits[:limit] if limit else edits


def result_path(out: Path, method: str, edit_id: str) -> Path:
    return Path(out) / "results" / method / f"{edit_id}.json"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- memory
def _reset_peak_memory(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: resets the process's peak RSS (VmHWM), so each edit gets its own figure
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory_mb(device: str) -> dict:
    out = {}
    if device.startswith("cuda") and torch.cuda.is_available():
        out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["process_peak_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        import resource

        out["process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


# ---------------------------------------------------------------------------- one edit
def diffusion_models(preset: str) -> tuple[str, str]:
    if preset == "toy":
        from piva.toyworld.quality import CONTROLNET_DIR, PRIOR_DIR

        return str(PRIOR_DIR), str(CONTROLNET_DIR)
    from piva.nerfstudio.piva_pipeline import DEFAULT_CONTROLNET, DEFAULT_MODEL

    return DEFAULT_MODEL, DEFAULT_CONTROLNET


def eval_cameras(opts: RunOptions):
    from piva.data.views import Camera
    from piva.metrics.cameras import noe_cameras

    p = EDIT_PRESETS[opts.preset]
    cams = noe_cameras(opts.eval_views, elevation=p["eval_elevation"], distance=p["eval_distance"], fov_y=p["eval_fov"])
    views = [Camera(c, cams["fov_y"], p["eval_size"], p["eval_size"]) for c in cams["c2w"]]
    setting = {"views": opts.eval_views, "elevation": p["eval_elevation"], "distance": p["eval_distance"],
               "fov_y": p["eval_fov"], "size": p["eval_size"],
               "duplicate_end_view": "rendered, left out of every average; consistency wraps last unique -> first"}
    return views, torch.from_numpy(cams["unique"]), setting


def original_renders(obj: dict, record: dict, opts: RunOptions) -> torch.Tensor:
    """The original scene at the evaluation cameras, rendered once per object and kept."""
    from piva.nerfstudio.views import load_pipeline, render_views

    cams, _, setting = eval_cameras(opts)
    cache = object_dir(opts.prepare.root, obj) / f"original_eval_{setting['views']}x{setting['size']}.pt"
    if cache.is_file():
        return torch.load(cache)
    pipeline, _ = load_pipeline(Path(record["source_checkpoints"]).parent, device=opts.setting("device"))
    rgb = render_views(pipeline, cams, progress=f"[noe] rendering original {obj['id']}")["rgb"]
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    torch.save(rgb, tmp)
    os.replace(tmp, cache)
    return rgb


def run_edit(edit: dict, obj: dict, record: dict, method: str, opts: RunOptions) -> Optional[Path]:
    """Edit the source scene with one method (nerfstudio backend); None for the no-edit reference."""
    if method == "no-edit":
        return None
    from piva.toyworld import nerf

    model, controlnet = diffusion_models(opts.preset)
    p = EDIT_PRESETS[opts.preset]
    cfg = nerf.edit_config(
        Path(record["data"]), Path(record["source_checkpoints"]), Path(opts.out) / "work" / method,
        edit["source_prompt"], edit["target_prompt"], Path(model), Path(controlnet) if method == "piva" else None,
        method=method, steps=opts.setting("steps"), render_short_side=p["render_short_side"], lr=p["lr"],
        identity_weight=p["identity_weight"], rays=p["rays"], small=p["small"], device=p["device"],
        white_background=obj["source"] != "toyworld", same_latent=p.get("same_latent"),
    )
    if opts.preset != "toy":  # hub ids, not folders
        cfg.pipeline.diffusion_model, cfg.pipeline.controlnet_model = model, controlnet
    cfg.experiment_name = edit["id"]
    return nerf.edit_scene(cfg)


def evaluate_edit(edit: dict, obj: dict, record: dict, edit_run: Optional[Path], opts: RunOptions, models: dict) -> dict:
    from piva.metrics.evaluate import evaluate_views
    from piva.nerfstudio.views import load_pipeline, render_views

    cams, unique, setting = eval_cameras(opts)
    original = original_renders(obj, record, opts)
    if edit_run is None:
        edited = original.clone()
    else:
        pipeline, _ = load_pipeline(edit_run, device=opts.setting("device"))
        edited = render_views(pipeline, cams, progress=f"[noe] rendering {edit['id']}")["rgb"]
    metrics = evaluate_views(edited, original, edit["source_prompt"], edit["target_prompt"], unique,
                             image_text=models.get("image_text"), lpips=models.get("lpips"),
                             unavailable=models.get("unavailable"))
    metrics["cameras"] = setting
    return metrics, edited, original


def save_thumbnail(path: Path, original: torch.Tensor, edited: torch.Tensor, n: int = 4) -> None:
    import imageio.v3 as iio
    import numpy as np

    idx = torch.linspace(0, len(original) - 2, n).round().long()
    rows = [torch.cat(list(x[idx]), dim=2) for x in (original, edited)]
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).clamp(0, 1).numpy()
    scale = max(1, 96 // original.shape[-1])
    arr = (grid * 255).round().astype(np.uint8)
    if scale > 1:
        arr = np.kron(arr, np.ones((scale, scale, 1), np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    iio.imwrite(tmp, arr)
    os.replace(tmp, path)


def _threestudio_edit(edit: dict, obj: dict, method: str, opts: RunOptions, models: dict):
    """Source scene + edit with threestudio's launch.py; its test stage renders the Noe cameras."""
    from piva.metrics.cameras import noe_cameras
    from piva.metrics.evaluate import evaluate_views
    from piva.threestudio import backend

    if method == "no-edit":
        raise NotAvailable("no-edit with the threestudio backend: read the '-original' renders of any edit")
    root = backend.check_backend(opts.threestudio_root)
    record = prepare_object(obj, opts.prepare, train=False)
    work = Path(opts.out) / "threestudio"
    cmd, trial = backend.source_command(root, Path(record["data"]), work, obj["id"])
    if not list((trial / "save").glob("it*-test")):  # the test stage runs once training has finished
        backend.run(cmd, root)
    _reset_peak_memory(opts.setting("device"))
    t0 = time.perf_counter()
    cmd, edit_trial = backend.edit_command(root, method, trial / "ckpts" / "last.ckpt", edit, work, opts.edit_steps)
    backend.run(cmd, root)
    wall = time.perf_counter() - t0
    edited, original = backend.test_renders(edit_trial)
    unique = torch.from_numpy(noe_cameras(len(edited))["unique"])
    metrics = evaluate_views(edited, original, edit["source_prompt"], edit["target_prompt"], unique,
                             image_text=models.get("image_text"), lpips=models.get("lpips"),
                             unavailable=models.get("unavailable"))
    metrics["cameras"] = {"views": len(edited), "elevation": 15.0, "distance": 4.0, "fov_y": 50.0,
                          "source": "threestudio test stage (piva-noe.yaml / dds-noe.yaml)"}
    return metrics, edited, original, wall, edit_trial


def run_one(edit: dict, obj: dict, method: str, opts: RunOptions, models: dict) -> dict:
    """Prepare (if needed), edit, evaluate and store one (method, edit); returns the stored record."""
    device = opts.setting("device")
    if opts.backend == "threestudio":
        metrics, edited, original, wall, edit_run = _threestudio_edit(edit, obj, method, opts, models)
        memory = _peak_memory_mb(device)  # this process only; threestudio's own peak is in its logs
    else:
        record = prepare_object(obj, opts.prepare)
        _reset_peak_memory(device)
        t0 = time.perf_counter()
        edit_run = run_edit(edit, obj, record, method, opts)
        wall = time.perf_counter() - t0
        memory = _peak_memory_mb(device)
        metrics, edited, original = evaluate_edit(edit, obj, record, edit_run, opts, models)
    thumb = result_path(opts.out, method, edit["id"]).with_suffix(".png")
    save_thumbnail(thumb, original, edited)
    result = {
        "edit": edit, "method": method, "preset": opts.preset, "backend": opts.backend,
        "edit_steps": 0 if method == "no-edit" else opts.setting("steps"),
        "metrics": metrics, "wall_time_s": round(wall, 1), "peak_memory": memory,
        "edited_run": str(edit_run) if edit_run else None, "thumbnail": thumb.name,
        "machine": {"device": device, "torch": torch.__version__, "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None},
    }
    atomic_write_text(result_path(opts.out, method, edit["id"]), json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------------- many edits
def load_models(opts: RunOptions) -> dict:
    """CLIP (or the toy judge, labelled) and LPIPS; what cannot be loaded is recorded, never faked."""
    from piva.metrics.evaluate import MetricUnavailable, load_clip, load_lpips, load_toy_judge

    models: dict = {"unavailable": {}}
    if opts.preset == "toy":
        models["image_text"] = load_toy_judge()
        models["unavailable"]["clip"] = "toy world: the toy judge stands in for CLIP (figures labelled judge_*)"
    else:
        try:
            models["image_text"] = load_clip(opts.clip_model, opts.clip_pretrained, opts.clip_weights)
        except MetricUnavailable as exc:
            models["unavailable"]["clip"] = str(exc)
            print(f"[noe] CLIP metrics cannot be computed: {exc}")
    try:
        models["lpips"] = load_lpips("alex")
    except MetricUnavailable as exc:
        models["unavailable"]["lpips"] = str(exc)
        print(f"[noe] LPIPS cannot be computed: {exc}")
    return models


def pending(manifest: dict, edits: list[dict], opts: RunOptions) -> list[tuple[dict, dict, str]]:
    objects = {o["id"]: o for o in manifest["objects"]}
    return [(e, objects[e["object"]], m) for m in opts.methods for e in edits
            if not result_path(opts.out, m, e["id"]).is_file()]


def run_benchmark(manifest: dict, edits: list[dict], opts: RunOptions, ray_address: Optional[str] = None) -> dict:
    """Run what is not done yet, then write the leaderboards; returns {'done', 'skipped', 'failed'}."""
    from piva.noe.leaderboard import write_leaderboards

    bad = [m for m in opts.methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}: choose from {', '.join(METHODS)}")
    todo = pending(manifest, edits, opts)
    total = len(edits) * len(opts.methods)
    print(f"[noe] {total - len(todo)} of {total} edits already done; {len(todo)} to run -> {opts.out}")
    failed: dict = {}
    if ray_address is not None and todo:
        failed = _run_with_ray(todo, opts, ray_address)
    else:
        models = load_models(opts) if todo else {}
        for i, (edit, obj, method) in enumerate(todo, 1):
            print(f"[noe] ({i}/{len(todo)}) {method} :: {edit['id']}: '{edit['source_prompt']}' -> '{edit['target_prompt']}'")
            try:
                r = run_one(edit, obj, method, opts, models)
                m = r["metrics"]
                print(f"[noe]   done in {r['wall_time_s']} s: " + ", ".join(
                    f"{k} {m[k]:.4g}" for k in ("clip_score", "judge_score", "lpips", "psnr") if k in m))
            except NotAvailable as exc:
                failed[f"{method}/{edit['id']}"] = str(exc)
                print(f"[noe]   skipped: {exc}")
    pages = write_leaderboards(opts.out, manifest_name=manifest.get("name", "noe"))
    print(f"[noe] leaderboards: {pages['markdown']} and {pages['html']}")
    return {"done": total - len(todo), "ran": len(todo) - len(failed), "failed": failed, **pages}


def _run_with_ray(todo, opts: RunOptions, address: str) -> dict:
    """One edit per Ray task (one GPU each on a GPU preset); results land in the shared output folder."""
    try:
        import ray
    except ImportError:
        raise SystemExit("piva: error: --ray needs Ray (pip install 'ray[default]'); leave --ray out to run locally")
    ray.init(address=None if address == "local" else address)
    gpus = 1 if opts.setting("device").startswith("cuda") else 0

    @ray.remote(num_gpus=gpus)
    def task(edit, obj, method):
        try:
            return None, run_one(edit, obj, method, opts, load_models(opts))["edit"]["id"]
        except NotAvailable as exc:
            return f"{method}/{edit['id']}", str(exc)

    failed = {}
    for key, value in ray.get([task.remote(e, o, m) for e, o, m in todo]):
        if key is not None:
            failed[key] = value
    return failed
