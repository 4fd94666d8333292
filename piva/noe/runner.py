"""`python benchmark/run.py`: edit every (method, edit) of a Noe manifest, evaluate, and rank.

Every finished edit is written at once (`results/<method>/<edit id>.json`, atomically);
a killed run starts again where it stopped: finished edits are skipped and an
interrupted edit resumes from its latest nerfstudio checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol, Sequence

import numpy as np
import torch

from piva.io import atomic_torch_save, atomic_write_json
from piva.noe.prepare import NotAvailable, PrepareOptions, object_dir, object_scene, prepare_object
from piva.noe.presets import EvalOrbit, Preset, get_preset

if TYPE_CHECKING:
    from piva.threestudio.backend import LaunchSettings

METHODS = ("piva", "dds", "sds", "no-edit")
SPLAT_METHODS = ("piva-splat", "dds-splat")
"""The same edits on splatfacto scenes (nerfstudio backend; ask for them with --methods)."""
# The registered nerfstudio method each benchmark method runs (objects: the paper's lambda 0.4).
REGISTERED_METHODS = {"piva": "piva-object", "dds": "piva-dds", "sds": "piva-sds",
                      "piva-splat": "piva-splat", "dds-splat": "piva-splat-dds"}
CAPTURE_METHODS = {**REGISTERED_METHODS, "piva": "piva"}
"""A captured scene gets the paper's real-scene setting (`piva`, lambda 0.2)."""


def registered_method(base: str, obj: dict) -> str:
    """The registered nerfstudio method a benchmark method runs on this object."""
    return (CAPTURE_METHODS if obj.get("source") == "capture" else REGISTERED_METHODS)[base]
# threestudio's volume renderer on CPU: samples along the grid's diagonal (paper: 512), the size the
# toy world's objects need at 32 px; the occupancy grid skips the empty ones either way.
CPU_SAMPLES_PER_RAY = 128


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
    seeds: Sequence[int] = (0,)
    """Each seed is its own run of every (method, edit): the scene's and the guidance's random draws. Methods
    on the same seed start from the same random state and are judged at the same cameras; the paired tables
    compare them seed by seed."""
    reported: Optional[dict] = None
    """The manifest's reported rows (`piva.noe.leaderboard.reported_rows`), shown beside ours: only on the manifest
    they were measured on (Noe's table 2, in2n's table 3); None for any other."""

    @property
    def sizes(self) -> Preset:
        return get_preset(self.preset)

    @property
    def device(self) -> str:
        return self.sizes.run.device

    @property
    def steps(self) -> int:
        return self.edit_steps if self.edit_steps is not None else self.sizes.run.edit_steps

    def settings(self) -> dict:
        """What every result in `out` shares, so that its figures compare: a run with other settings into the
        same folder is refused (`check_out`)."""
        source_steps = (self.prepare.run_size if self.prepare is not None else self.sizes.run).source_steps
        return {"backend": self.backend, "preset": self.preset, "edit_steps": self.steps, "source_steps": source_steps,
                "eval_views": self.eval_views,
                "image_text_model": "toy judge" if self.preset == "toy" else f"{self.clip_model}/{self.clip_pretrained}"}


def default_out(preset: str, backend: str = "nerfstudio", edit_steps: Optional[int] = None,
                source_steps: Optional[int] = None) -> Path:
    """outputs/noe (full) or outputs/noe-toy, with the backend and any changed step count in the name: runs
    made otherwise never share a folder, so none counts another's results as its own."""
    name = "noe-toy" if preset == "toy" else "noe" if preset == "full" else f"noe-{preset}"
    if backend != "nerfstudio":
        name += f"-{backend}"
    if edit_steps is not None:
        name += f"-edit{edit_steps}"
    if source_steps is not None:
        name += f"-source{source_steps}"
    return Path("outputs") / name


SETTINGS_FILE = "benchmark.json"


def check_out(opts: RunOptions) -> None:
    """Refuse (one line) to add results to a folder whose results were made with other settings; record the
    settings in a new folder."""
    path = Path(opts.out) / SETTINGS_FILE
    wanted = opts.settings()
    kept = json.loads(path.read_text()) if path.is_file() else {}
    diff = [f"{k} {kept[k]!r} (now {v!r})" for k, v in wanted.items() if k in kept and kept[k] != v]
    if diff:
        raise ValueError(f"{opts.out} holds results made with {', '.join(diff)}: give another --out (or leave --out "
                         "out: the default folder is named after the backend and step counts)")
    if not kept and (Path(opts.out) / "results").is_dir():  # results from before settings were recorded
        print(f"[noe] note: {opts.out} has results from before settings were recorded; each is checked on its own")
    if kept != {**kept, **wanted}:
        atomic_write_json(path, {**kept, **wanted})


def select_edits(manifest: dict, objects=None, types=None, limit: Optional[int] = None, ids=None) -> list[dict]:
    """The manifest's edits of these objects, types and ids (an older type name selects its current one)."""
    from piva.noe.validate import edit_type

    types = {edit_type(t) for t in types} if types else None
    if ids:
        unknown = sorted(set(ids) - {e["id"] for e in manifest["edits"]})
        if unknown:
            raise ValueError(f"no edit {', '.join(unknown)} in the manifest (its edit ids are listed in its 'edits')")
    edits = [e for e in manifest["edits"] if (not objects or e["object"] in objects)
             and (not types or edit_type(e["type"]) in types) and (not ids or e["id"] in ids)]
    return edits[:limit] if limit else edits


def result_path(out: Path, method: str, edit_id: str, seed: int = 0) -> Path:
    """Seed 0 keeps the plain name, so results stored before seeds existed stay where they were."""
    return Path(out) / "results" / method / f"{seeded(edit_id, seed)}.json"


def seeded(name: str, seed: int) -> str:
    return name if seed == 0 else f"{name}@seed{seed}"


def provenance(opts: RunOptions, method: str, seed: int, source_fingerprint: Optional[str] = None) -> dict:
    """What made a result: stored with it, so that a run never counts a result made otherwise as its own."""
    from piva import __version__

    return {**opts.settings(), "edit_steps": 0 if method == "no-edit" else opts.steps, "method": method,
            "guidance_changes": method_variant(method)[1], "seed": seed, "piva": __version__,
            "source_fingerprint": source_fingerprint}


# Fields that a result made before provenance was recorded carries at its top level.
_LEGACY_FIELDS = ("backend", "preset", "edit_steps", "seed", "guidance_changes")


def stale_reason(result: dict, wanted: dict) -> Optional[str]:
    """Why a stored result was not made by this run's settings (None: it was). The source fingerprint counts
    where both sides know it; the piva version is recorded, not compared."""
    made = result.get("provenance")
    if made is None:  # older results: what they recorded at their top level
        made = {k: result.get(k) for k in _LEGACY_FIELDS}
        made["guidance_changes"] = made["guidance_changes"] or {}
    for key, value in wanted.items():
        if key == "piva" or key not in made:
            continue
        if key == "source_fingerprint" and (value is None or made[key] is None):
            continue
        if made[key] != value:
            return f"{key} {made[key]!r}, not {value!r}"
    return None


def source_fingerprint_of(opts: RunOptions, obj: dict, method: str) -> Optional[str]:
    """The fingerprint of the object's source scene as last prepared (None where not known yet)."""
    if opts.backend != "nerfstudio":
        return None
    kept = object_dir(opts.prepare.root, obj) / "prepared.json" if opts.prepare is not None else None
    if kept is None or not kept.is_file():
        return None
    splats = method_variant(method)[0] in SPLAT_METHODS
    return json.loads(kept.read_text()).get("splat_source_fingerprint" if splats else "source_fingerprint")


def stored_result(opts: RunOptions, obj: dict, edit: dict, method: str, seed: int) -> Optional[dict]:
    """The stored result of (method, edit, seed) if this run's settings made it, else None (to run again)."""
    path = result_path(opts.out, method, edit["id"], seed)
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        print(f"[noe] {path} cannot be read: running that edit again")
        return None
    why = stale_reason(result, provenance(opts, method, seed, source_fingerprint_of(opts, obj, method)))
    if why is None and "metrics" not in result:
        why = "no metrics (an incomplete result)"
    made_for = result.get("edit") or {}
    if why is None and any(made_for.get(k) != edit.get(k) for k in ("source_prompt", "target_prompt")):
        why = f"other prompts ({made_for.get('source_prompt')!r} -> {made_for.get('target_prompt')!r})"
    if why:
        print(f"[noe] {path} was made with {why}: running that edit again")
        return None
    return result


# ---------------------------------------------------------------------------- memory
def _reset_peak_memory(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # Memory the last edit freed but glibc kept goes back first: the reset peak starts from what is in use,
    # not from the heap a worker's earlier edits left (measured: ~230 MB after a toy edit).
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
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


# ---------------------------------------------------------------------------- backends
def eval_orbit(opts: RunOptions, data: Path) -> tuple[EvalOrbit, dict]:
    """The evaluation orbit of one object, for every backend: the preset fixes elevation and size; distance
    and fov are the object's own capture's where the preset leaves them open (toy), so the object is seen
    whole and at the scale it was reconstructed at. Returns it and the capture."""
    from piva.data.views import capture_geometry

    capture = capture_geometry(data)
    orbit = opts.sizes.eval.follow(capture)
    if abs(orbit.distance / capture["distance"] - 1) > 0.1:
        print(f"[noe] note: {data} was captured from distance {capture['distance']:.2f}; the preset's "
              f"evaluation orbit is fixed at {orbit.distance:.2f} (the Noe protocol)")
    return orbit, capture



@dataclass
class EditOutcome:
    """What a backend hands back for one (method, edit): renders at the evaluation cameras and how it ran."""

    edited: torch.Tensor
    original: torch.Tensor
    unique: torch.Tensor
    cameras: dict
    wall_time_s: float
    run: Optional[Path]
    reconstruction: Optional[tuple] = None
    """(source scene, ground truth) at held-out views, [N,3,H,W] each: what the no-edit baseline measures."""
    camera_list: Optional[list] = None
    """The evaluation cameras (piva.data.views.Camera), where the backend has them: exact toy figures need them."""
    resumed_after_steps: int = 0
    """Edit steps an earlier, stopped run had done: `wall_time_s` then covers only the rest."""
    peak_memory: Optional[dict] = None
    """Measured by the backend that ran the edit in another process (threestudio's launch.py); None: this process's."""
    source_fingerprint: Optional[str] = None
    """Of the source scene's checkpoint the edit started from (piva.io.file_fingerprint): what the result is made from."""
    photos: Optional[torch.Tensor] = None
    """A capture's own photographs at the evaluation cameras (its held-out frames), [N,3,H,W]."""
    wraps: bool = True
    """The evaluation views close a loop (an orbit), so consistency compares the last with the first; a capture's
    held-out frames lie along an open path."""


class Backend(Protocol):
    """Prepares an object, edits it with a method and renders the evaluation cameras (nerfstudio, threestudio)."""

    def edit(self, edit: dict, obj: dict, method: str, seed: int = 0) -> EditOutcome: ...


def diffusion_models(opts: RunOptions) -> tuple[Optional[str], Optional[str]]:
    """The toy prior for the toy preset; else the method's own (hub ids). Both backends use it."""
    if opts.preset == "toy":
        from piva.toyworld.quality import CONTROLNET_DIR, PRIOR_DIR

        return str(PRIOR_DIR), str(CONTROLNET_DIR)
    return None, None


class NerfstudioBackend:
    """The registered nerfstudio methods (`piva-object`, `piva-dds`, `piva-sds`) at the preset's sizes."""

    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts

    def cameras(self, data: Path):
        """One object's evaluation cameras: views, unique mask, recorded setting (orbit from `eval_orbit`)."""
        from piva.data.cameras import noe_cameras
        from piva.data.views import Camera

        orbit, capture = eval_orbit(self.opts, data)
        cams = noe_cameras(self.opts.eval_views, elevation=orbit.elevation, distance=orbit.distance, fov_y=orbit.fov_y)
        views = [Camera(c, cams["fov_y"], orbit.size, orbit.size) for c in cams["c2w"]]
        setting = {"views": self.opts.eval_views, "elevation": orbit.elevation, "distance": round(orbit.distance, 4),
                   "fov_y": round(orbit.fov_y, 4), "size": orbit.size,
                   "capture": {k: round(v, 4) for k, v in capture.items()},
                   "duplicate_end_view": "rendered, left out of every average; consistency wraps last unique -> first"}
        return views, torch.from_numpy(cams["unique"]), setting

    def render(self, run: Path, what: str, cams) -> torch.Tensor:
        """At piva cameras (an object's orbit) or nerfstudio Cameras (a capture's held-out frames)."""
        from piva.nerfstudio.views import load_pipeline, render_cameras, render_views

        pipeline, _ = load_pipeline(run, device=self.opts.device)
        draw = render_views if isinstance(cams, list) else render_cameras
        return draw(pipeline, cams, progress=f"[noe] rendering {what}")["rgb"]

    def original(self, obj: dict, record: dict, cams: list, s: dict, splats: bool = False) -> torch.Tensor:
        """The original scene at the evaluation cameras, rendered once per object, orbit and representation."""
        fingerprint = record.get("splat_source_fingerprint" if splats else "source_fingerprint") or "unknown"
        if "held_out" in s:  # a capture's held-out frames
            key = f"held-out-{s['views']}-{s['size'][0]}x{s['size'][1]}-{fingerprint[:8]}"
        else:
            key = f"{s['views']}x{s['size']}-el{s['elevation']:g}-d{s['distance']:.3f}-f{s['fov_y']:.2f}-{fingerprint[:8]}"
        cache = object_dir(self.opts.prepare.root, obj) / f"original_eval_{key}{'-splat' if splats else ''}.pt"
        if cache.is_file():
            return torch.load(cache)
        checkpoints = record["splat_source_checkpoints" if splats else "source_checkpoints"]
        rgb = self.render(Path(checkpoints).parent, f"original {obj['id']}", cams)
        atomic_torch_save(rgb, cache)
        return rgb

    def reconstruction(self, obj: dict, record: dict, most: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """The source scene and the prepared ground truth at held-out views (the dataset's test split)."""
        from piva.data.views import load_rgba, read_views

        data = Path(record["data"])
        split = "test" if (data / "transforms_test.json").is_file() else "val"
        views = read_views(data, split)
        keep = sorted({round(i) for i in np.linspace(0, len(views.cameras) - 1, min(most, len(views.cameras)))})
        backdrop = object_scene(obj, data).backdrop
        truth = torch.stack([load_rgba(views.image_paths[i], backdrop)[0] for i in keep]).permute(0, 3, 1, 2)
        source = self.render(Path(record["source_checkpoints"]).parent, f"source {obj['id']} at held-out views",
                             [views.cameras[i] for i in keep])
        return source, truth

    def capture_views(self, obj: dict, record: dict):
        """A capture's evaluation cameras: its held-out frames (nerfstudio's eval split), with their photographs."""
        from piva.nerfstudio.views import held_out_views

        scene = object_scene(obj, Path(record["data"]))
        cameras, photos, paths = held_out_views(scene)
        poses = Path(record["data"]) / "transforms.json"
        listed = poses.is_file() and any(f"{s}_filenames" in json.loads(poses.read_text()) for s in ("test", "val"))
        setting = {"views": len(paths), "held_out": "the capture's own test list" if listed else
                   f"every {scene.eval_every}th frame (nerfstudio's eval split)", "frames": [p.name for p in paths],
                   "size": [int(photos.shape[3]), int(photos.shape[2])], "downscale": scene.downscale}
        return cameras, photos, setting

    def edit(self, edit: dict, obj: dict, method: str, seed: int = 0) -> EditOutcome:
        from piva.nerfstudio import runs

        opts = self.opts
        base, guidance = method_variant(method)
        splats = base in SPLAT_METHODS
        record = prepare_object(obj, opts.prepare, splats=splats)
        source = Path(record["splat_source_checkpoints" if splats else "source_checkpoints"])
        _reset_peak_memory(opts.device)
        t0 = time.perf_counter()
        run = None
        if method != "no-edit":
            model, controlnet = diffusion_models(opts)
            cfg = runs.edit_config(
                registered_method(base, obj), object_scene(obj, Path(record["data"])), source,
                Path(opts.out) / "work" / method, edit["source_prompt"], edit["target_prompt"],
                opts.sizes.run.with_edit_steps(opts.edit_steps), diffusion_model=model, controlnet_model=controlnet,
                guidance=guidance,
            )
            cfg.experiment_name = seeded(edit["id"], seed)
            cfg.machine.seed = seed
            before = runs.latest_checkpoint(Path(cfg.get_base_dir()) / "nerfstudio_models")
            try:
                resumed = runs.edit_steps_done(before) if before is not None else 0
                run = runs.edit(cfg)
            except runs.RunMismatch as exc:  # the benchmark's own scratch, made otherwise: start it again
                print(f"[noe] discarding a stale edit run: {exc}".split(": resume")[0])
                shutil.rmtree(cfg.get_base_dir())
                resumed, t0 = 0, time.perf_counter()
                run = runs.edit(cfg)
        wall = time.perf_counter() - t0
        photos = None
        if obj["source"] == "capture":
            cams, photos, setting = self.capture_views(obj, record)
            unique, camera_list = torch.ones(len(photos), dtype=torch.bool), None
        else:
            cams, unique, setting = self.cameras(Path(record["data"]))
            camera_list = cams
        original = self.original(obj, record, cams, setting, splats=splats)
        edited = original.clone() if run is None else self.render(run, edit["id"], cams)
        if method != "no-edit":
            recon = None
        elif photos is not None:
            recon = (original, photos)
        else:
            recon = self.reconstruction(obj, record)
        return EditOutcome(edited, original, unique, setting, wall, run, recon, camera_list=camera_list,
                           resumed_after_steps=0 if run is None else resumed,
                           source_fingerprint=record.get("splat_source_fingerprint" if splats else "source_fingerprint"),
                           photos=photos, wraps=photos is None)


class ThreestudioBackend:
    """threestudio's launch.py with the extension's configs; its test stage renders the Noe cameras."""

    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts

    @functools.cached_property
    def root(self) -> Path:
        """The threestudio checkout, checked once per backend (a clear error if it is missing or not set up)."""
        from piva.threestudio import backend

        return backend.check_backend(self.opts.threestudio_root)

    def settings(self, obj: dict, data: Path, capture: dict):
        """The preset's sizes and the object's inputs for the configs. The full preset keeps the paper's
        configs as they are; a smaller preset sets sizes, the toy prior, and edit cameras that follow the
        capture where its evaluation orbit does (as the nerfstudio methods edit at the captured views)."""
        from piva.threestudio.backend import LaunchSettings

        opts, sizes = self.opts, self.opts.sizes
        run = opts.prepare.run_size if opts.prepare is not None else sizes.run
        if opts.preset == "full":
            return LaunchSettings(device=run.device)
        run = run.with_edit_steps(opts.edit_steps)
        model, controlnet = diffusion_models(opts)
        follows = sizes.eval.distance is None or sizes.eval.fov_y is None
        return LaunchSettings(
            device=run.device, source_steps=run.source_steps, source_rays_per_batch=run.source_rays_per_batch,
            samples_per_ray=CPU_SAMPLES_PER_RAY if run.device == "cpu" else None, edit_steps=run.edit_steps, anneal_step=run.anneal_step,
            render_size=run.render_short_side, eval_size=sizes.eval.size, eval_views=opts.eval_views,
            background=object_scene(obj, data).backdrop, capture=capture if follows else None,
            model=model, controlnet=controlnet)

    def source(self, obj: dict) -> tuple[Path, LaunchSettings, EvalOrbit, dict]:
        """The object's source scene, fitted once by launch.py (a file lock makes parallel workers wait for it);
        returns (its checkpoint, the launch settings, the evaluation orbit, the capture)."""
        from filelock import FileLock

        from piva.threestudio import backend

        root = self.root
        record = prepare_object(obj, self.opts.prepare, train=False)
        data = Path(record["data"])
        orbit, capture = eval_orbit(self.opts, data)
        settings = self.settings(obj, data, capture)
        work = Path(self.opts.out) / "threestudio"
        work.mkdir(parents=True, exist_ok=True)
        with FileLock(str(work / f".{obj['id']}.source.lock")):
            cmd, trial = backend.source_command(root, data, work, obj["id"], settings)
            if not list((trial / "save").glob("it*-test")):  # the test stage runs once training has finished
                backend.run(cmd, root, trial)
        return backend.latest_checkpoint(trial), settings, orbit, capture

    def edit(self, edit: dict, obj: dict, method: str, seed: int = 0) -> EditOutcome:
        from piva.threestudio import backend

        opts = self.opts
        if method_variant(method)[1]:
            raise NotAvailable(f"{method} with the threestudio backend: sweeps run in nerfstudio (or set the knob "
                               "in the extension's YAML, system.guidance.<knob>)")
        if method == "no-edit":
            raise NotAvailable("no-edit with the threestudio backend: read the '-original' renders of any edit")
        if method in SPLAT_METHODS:
            raise NotAvailable(f"{method} with the threestudio backend: splats run in nerfstudio (splatfacto)")
        if obj["source"] == "capture":
            raise NotAvailable(f"capture {obj['id']} with the threestudio backend: captured scenes run in nerfstudio")
        root = self.root
        source_ckpt, settings, orbit, capture = self.source(obj)
        orbit = {"elevation": orbit.elevation, "distance": orbit.distance, "fov_y": orbit.fov_y}
        t0 = time.perf_counter()
        cmd, edit_trial = backend.edit_command(root, method, source_ckpt, edit, Path(opts.out) / "threestudio",
                                               None if opts.preset != "full" else opts.edit_steps,
                                               eval_orbit=orbit, settings=settings, seed=seed)
        resumed = backend.latest_checkpoint(edit_trial)  # what the command resumes from (a stopped run's)
        resumed = backend.checkpoint_step(resumed) if resumed is not None else 0
        started = time.time()
        memory = backend.run(cmd, root, edit_trial)  # launch.py's own peak, not this process's
        if opts.device.startswith("cuda"):
            memory.update(backend.gpu_peak(edit_trial, since=started))
        outcome = self.outcome(edit_trial, orbit, capture, time.perf_counter() - t0)
        from piva.io import file_fingerprint

        return dataclasses.replace(outcome, resumed_after_steps=resumed, peak_memory=memory,
                                   source_fingerprint=file_fingerprint(Path(source_ckpt).resolve()))

    @staticmethod
    def outcome(trial: Path, orbit: dict, capture: dict, wall: float) -> EditOutcome:
        """An edit's test-stage renders (edited and original) with the cameras they were drawn at: threestudio's
        evaluation orbit is `noe_cameras`, so the exact toy figures (success, background) are computed as for
        nerfstudio's renders."""
        from piva.data.cameras import noe_cameras
        from piva.data.views import Camera
        from piva.threestudio import backend

        edited, original = backend.test_renders(trial)
        size = int(edited.shape[-1])
        cams = noe_cameras(len(edited), elevation=orbit["elevation"], distance=orbit["distance"], fov_y=orbit["fov_y"])
        views = [Camera(c, cams["fov_y"], size, size) for c in cams["c2w"]]
        setting = {"views": len(edited), **orbit, "capture": capture, "size": size,
                   "source": "threestudio test stage (piva-noe.yaml / dds-noe.yaml, orbit overridden)"}
        return EditOutcome(edited, original, torch.from_numpy(cams["unique"]), setting, wall, trial, camera_list=views)


BACKENDS = {"nerfstudio": NerfstudioBackend, "threestudio": ThreestudioBackend}


def save_thumbnail(path: Path, original: torch.Tensor, edited: torch.Tensor, n: int = 4) -> None:
    """Four views, original above edited, enlarged to ~96 px."""
    from piva.data.images import save_image_grid

    idx = torch.linspace(0, len(original) - 2, n).round().long()
    save_image_grid(path, [original[idx], edited[idx]], scale=max(1, 96 // original.shape[-1]))


def toy_vocabulary_problem(edit: dict) -> Optional[str]:
    """Why the toy judge cannot score this edit (a caption it has never seen), or None."""
    from piva.toyworld.scenes import Scene

    for caption in (edit["source_prompt"], edit["target_prompt"]):
        try:
            Scene.from_caption(caption)
        except ValueError:
            return f"captions outside the toy judge's vocabulary (e.g. {caption!r}): it knows 'a <colour> <shape>' and a few parts"
    return None


def toy_figures(edit: dict, outcome: "EditOutcome", judge: Optional[tuple] = None) -> dict:
    """The judge's success per view and preservation against the exact toy scenes, on the unique evaluation views."""
    from piva.toyworld.evaluate import exact_edit_figures
    from piva.toyworld.scenes import Scene

    if not outcome.camera_list:  # threestudio renders its own test cameras: not computed there
        return {}
    keep = torch.as_tensor(outcome.unique, dtype=torch.bool)
    cams = [c for c, k in zip(outcome.camera_list, keep.tolist()) if k]
    figures = exact_edit_figures(outcome.edited[keep], outcome.original[keep], Scene.from_caption(edit["source_prompt"]),
                                 Scene.from_caption(edit["target_prompt"]), cams, judge=judge)
    return {k: v for k, v in figures.items() if isinstance(v, float)}


def image_text_for(edit: dict, models: dict, preset: str) -> tuple[Optional[object], dict]:
    """The image-text model that may score this edit, and what is not computed (with why)."""
    image_text, unavailable = models.get("image_text"), dict(models.get("unavailable") or {})
    if preset == "toy" and image_text is not None:
        why = toy_vocabulary_problem(edit)
        if why:
            image_text, unavailable["judge"] = None, why
    return image_text, unavailable


def edit_lock(opts: RunOptions, method: str, edit_id: str, seed: int):
    """One writer per edit: held from before training until its result is stored (released by the kernel if
    the holder dies). Another process already running it is told apart from a free edit at once."""
    from filelock import FileLock

    path = Path(opts.out) / "locks" / method / f"{seeded(edit_id, seed)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), timeout=0)


def run_one(edit: dict, obj: dict, method: str, opts: RunOptions, models: dict, seed: int = 0) -> dict:
    """Prepare (if needed), edit, evaluate and store one (method, edit, seed); returns the stored record.
    Raises NotAvailable when another process holds the edit."""
    from filelock import Timeout

    lock = edit_lock(opts, method, edit["id"], seed)
    try:
        lock.acquire()
    except Timeout:
        raise NotAvailable(f"another process is running {method}/{seeded(edit['id'], seed)} (lock {lock.lock_file}): "
                           "stop it or wait for it, then run again") from None
    try:
        done = stored_result(opts, obj, edit, method, seed)  # finished by another process since it was queued
        return done if done is not None else _run_one_locked(edit, obj, method, opts, models, seed)
    finally:
        lock.release()


def _run_one_locked(edit: dict, obj: dict, method: str, opts: RunOptions, models: dict, seed: int) -> dict:
    outcome = BACKENDS[opts.backend](opts).edit(edit, obj, method, seed)
    memory = outcome.peak_memory or _peak_memory_mb(opts.device)
    metrics, thumb = measure(edit, outcome, method, opts, models, seed, obj)
    device = opts.device
    result = {
        "edit": edit, "method": method, "seed": seed, "preset": opts.preset, "backend": opts.backend,
        "registered_method": (registered_method(method_variant(method)[0], obj)
                              if opts.backend == "nerfstudio" and method != "no-edit" else None),
        "guidance_changes": method_variant(method)[1],
        "edit_steps": 0 if method == "no-edit" else opts.steps,
        "metrics": metrics, "peak_memory": memory,
        # A resumed edit's time is not the edit's: left out of the time column, kept apart.
        "wall_time_s": None if outcome.resumed_after_steps else round(outcome.wall_time_s, 1),
        **({"resumed_after_steps": outcome.resumed_after_steps, "wall_time_after_resume_s": round(outcome.wall_time_s, 1)}
           if outcome.resumed_after_steps else {}),
        "edited_run": str(outcome.run) if outcome.run else None, "thumbnail": thumb.name,
        "machine": {"device": device, "torch": torch.__version__, "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None},
        "provenance": provenance(opts, method, seed,
                                 outcome.source_fingerprint or source_fingerprint_of(opts, obj, method)),
    }
    atomic_write_json(result_path(opts.out, method, edit["id"], seed), result)
    return result


def identity_metrics(outcome: "EditOutcome", models: dict) -> dict:
    """Whether a person is still recognisable (piva.metrics.identity), with the face model loaded once per
    process; what cannot be computed says why."""
    from piva.metrics.evaluate import MetricUnavailable
    from piva.metrics.identity import identity_figures, load_face_identity

    if "identity" not in models:
        try:
            models["identity"] = load_face_identity()
        except MetricUnavailable as exc:
            models["identity"] = exc
    model = models["identity"]
    if isinstance(model, MetricUnavailable):
        return {"identity_unavailable": str(model)}
    keep = torch.as_tensor(outcome.unique, dtype=torch.bool)
    return identity_figures(outcome.edited[keep], outcome.original[keep], model)


def measure(edit: dict, outcome: "EditOutcome", method: str, opts: RunOptions, models: dict,
            seed: int = 0, obj: Optional[dict] = None) -> tuple[dict, Path]:
    """The metrics of an edit's renders, and its thumbnail (written beside its result)."""
    from piva.metrics.evaluate import evaluate_views

    image_text, unavailable = image_text_for(edit, models, opts.preset)
    metrics = evaluate_views(outcome.edited, outcome.original, edit["source_prompt"], edit["target_prompt"],
                             outcome.unique, image_text=image_text, lpips=models.get("lpips"), unavailable=unavailable,
                             wrap=outcome.wraps)
    metrics["cameras"] = outcome.cameras
    if outcome.photos is not None and method != "no-edit":  # IN2N's protocol: the edit against the photographs
        metrics["against_photos"] = evaluate_views(outcome.edited, outcome.photos, "", "", lpips=models.get("lpips"))
    if obj is not None and obj.get("people"):
        metrics.update(identity_metrics(outcome, models))
    if opts.preset == "toy" and image_text is not None and outcome.camera_list:  # exact toy figures: success per view, what was kept
        metrics["toy"] = toy_figures(edit, outcome, models.get("toy_judge"))
    if outcome.reconstruction is not None:  # no-edit: how well the source scene matches the prepared views
        source, truth = outcome.reconstruction
        metrics["reconstruction"] = {**evaluate_views(source, truth, "", "", lpips=models.get("lpips")),
                                     "held_out": "the capture's held-out frames, not used to train the source scene"
                                     if outcome.photos is not None else
                                     "test (or val) split, not used to train the source scene"}
    thumb = result_path(opts.out, method, edit["id"], seed).with_suffix(".png")
    save_thumbnail(thumb, outcome.original, outcome.edited)
    return metrics, thumb


def rescore_one(edit: dict, obj: dict, method: str, opts: RunOptions, models: dict, seed: int = 0) -> dict:
    """Measure a stored edit again with today's metrics: its finished run is rendered again (threestudio: its test
    stage's renders are read again) and nothing trains, so the time and memory it was measured with stay as
    recorded. For when a metric's definition changes."""
    from piva.nerfstudio import runs

    path = result_path(opts.out, method, edit["id"], seed)
    old = json.loads(path.read_text())
    if opts.backend == "threestudio":  # its test stage's renders are on disk: read again, nothing renders
        trial = Path(old.get("edited_run") or "")
        if not list((trial / "save").glob("it*-test")):
            raise NotAvailable(f"its test renders ({trial}/save) are gone: delete {path} to run the edit again")
        cams = old["metrics"]["cameras"]
        orbit = {k: cams[k] for k in ("elevation", "distance", "fov_y")}
        outcome = ThreestudioBackend.outcome(trial, orbit, cams.get("capture"), old["wall_time_s"] or 0.0)
    else:  # nerfstudio: resume its finished run at the last step, so nothing trains and it renders again
        if method != "no-edit":
            run = Path(old.get("edited_run") or "")
            last = runs.latest_checkpoint(run / "nerfstudio_models") if run.is_dir() else None
            if last is None or runs.edit_steps_done(last) < old["edit_steps"]:
                raise NotAvailable(f"its run ({run}) is gone or unfinished: delete {path} to run the edit again")
        opts = dataclasses.replace(opts, edit_steps=old["edit_steps"] or None)
        outcome = BACKENDS[opts.backend](opts).edit(edit, obj, method, seed)
    metrics, _ = measure(edit, outcome, method, opts, models, seed, obj)
    result = {**old, "metrics": metrics,
              "rescored": {"on": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                           "note": "metrics measured again from the stored run; time and memory as recorded"}}
    atomic_write_json(path, result)
    return result


# ---------------------------------------------------------------------------- many edits
def load_models(opts: RunOptions) -> dict:
    """CLIP (or the toy judge, labelled) and LPIPS; what cannot be loaded is recorded, never faked."""
    from piva.metrics.evaluate import MetricUnavailable, load_clip, load_lpips

    models: dict = {"unavailable": {}}
    if opts.preset == "toy":
        from piva.toyworld.judge import create_judge, load_toy_judge

        models["toy_judge"] = create_judge()  # loaded once: the evaluator's interface and the exact figures
        models["image_text"] = load_toy_judge(models["toy_judge"])
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


def pending(manifest: dict, edits: list[dict], opts: RunOptions) -> list[tuple[dict, dict, str, int]]:
    """(edit, object, method, seed) not stored yet: seed-major, then method-major, so a stopped run
    leaves whole seeds of whole methods to compare."""
    objects = {o["id"]: o for o in manifest["objects"]}
    return [(e, objects[e["object"]], m, s) for s in opts.seeds for m in opts.methods for e in edits
            if stored_result(opts, objects[e["object"]], e, m, s) is None]


def method_variant(method: str) -> tuple[str, dict]:
    """'piva+identity_weight=0+adapter_rank=8' -> ('piva', {'identity_weight': 0.0, 'adapter_rank': 8}): a sweep
    runs the registered method with these `GuidanceConfig` fields changed and nothing else, stored as a method of
    its own (results/<the whole name>/), so the leaderboard pairs it with the others."""
    import typing

    from piva.guidance.score import GuidanceConfig

    base, *changes = method.split("+")
    if not changes:
        return base, {}
    if base not in REGISTERED_METHODS:
        raise ValueError(f"{method}: only a method that edits takes GuidanceConfig changes "
                         f"({', '.join(REGISTERED_METHODS)}), e.g. piva+identity_weight=0")
    hints = typing.get_type_hints(GuidanceConfig)
    knobs = {}
    for f in dataclasses.fields(GuidanceConfig):  # the scalar knobs; Optional[X] takes an X
        hint = hints[f.name]
        kinds = [k for k in typing.get_args(hint) if k is not type(None)] if typing.get_origin(hint) is typing.Union \
            else [hint]
        if f.name not in ("mode", "source_prompt", "target_prompt") and len(kinds) == 1 and \
                (kinds[0] in (bool, int, float, str) or typing.get_origin(kinds[0]) is typing.Literal):
            knobs[f.name] = kinds[0]
    out = {}
    for change in changes:
        key, eq, text = change.partition("=")
        if not eq or key not in knobs:
            raise ValueError(f"{method}: '{change}' is not KEY=VALUE of a GuidanceConfig knob; knobs: " + ", ".join(knobs))
        kind = knobs[key]
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{method}: {key} takes true or false, not {text!r}")
            out[key] = text.lower() in ("true", "1")
        elif typing.get_origin(kind) is typing.Literal:
            if text not in typing.get_args(kind):
                raise ValueError(f"{method}: {key} takes one of {', '.join(typing.get_args(kind))}, not {text!r}")
            out[key] = text
        else:
            try:
                out[key] = kind(text)
            except ValueError:
                raise ValueError(f"{method}: {key} takes a {kind.__name__}, not {text!r}") from None
    return base, out


def check_methods(methods: Sequence[str]) -> None:
    seen = [m for i, m in enumerate(methods) if m in methods[:i]]
    if seen:
        raise ValueError(f"--methods names {', '.join(sorted(set(seen)))} twice: give each method once")
    from piva.guidance.score import GuidanceConfig

    for m in methods:  # a knob's bad value (e.g. identity_weight=-1) is refused before anything runs
        changes = method_variant(m)[1]
        if changes:
            try:
                GuidanceConfig(**changes)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{m}: {exc}") from None
    bad = [m for m in methods if method_variant(m)[0] not in METHODS + SPLAT_METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}: choose from {', '.join(METHODS + SPLAT_METHODS)} "
                         "(a sweep: piva+KNOB=VALUE, e.g. piva+identity_weight=0)")


def rescore_benchmark(manifest: dict, edits: list[dict], opts: RunOptions) -> dict:
    """Measure the stored results among `edits` again (`rescore_one`), then write the leaderboards."""
    from piva.noe.leaderboard import write_leaderboards

    check_methods(opts.methods)
    check_out(opts)
    objects = {o["id"]: o for o in manifest["objects"]}
    stored = [(e, m, s) for s in opts.seeds for m in opts.methods for e in edits
              if result_path(opts.out, m, e["id"], s).is_file()]
    print(f"[noe] measuring {len(stored)} stored result(s) again -> {opts.out}")
    models, failed = (load_models(opts) if stored else {}), {}
    for i, (edit, method, seed) in enumerate(stored, 1):
        print(f"[noe] ({i}/{len(stored)}) {method} :: {seeded(edit['id'], seed)}")
        try:
            rescore_one(edit, objects[edit["object"]], method, opts, models, seed)
        except NotAvailable as exc:
            failed[f"{method}/{seeded(edit['id'], seed)}"] = str(exc)
            print(f"[noe]   skipped: {exc}")
    pages = write_leaderboards(opts.out, manifest_name=manifest.get("name", "noe"), reported=opts.reported)
    return {"rescored": len(stored) - len(failed), "failed": failed, **pages}


def run_benchmark(manifest: dict, edits: list[dict], opts: RunOptions, ray_address: Optional[str] = None,
                  workers: int = 1) -> dict:
    """Run what is not done yet, then write the leaderboards; returns {'done', 'skipped', 'failed'}.
    `workers` > 1: that many edits at once in local processes (`_run_in_processes`)."""
    from piva.noe.leaderboard import write_leaderboards

    check_methods(opts.methods)
    check_out(opts)
    todo = pending(manifest, edits, opts)
    total = len(edits) * len(opts.methods) * len(opts.seeds)
    if opts.preset == "toy":
        objects = {o["id"]: o for o in manifest["objects"]}
        foreign = sorted({e["object"] for e in edits if objects[e["object"]]["source"] != "toyworld"})
        if foreign:
            print(f"[noe] --preset toy on objects that are not toy-world ones ({', '.join(foreign)}): the toy judge "
                  "scores only captions in its vocabulary (other edits: judge figures not computed); PSNR, SSIM and "
                  "LPIPS against the original are computed; evaluation cameras follow each object's capture")
    print(f"[noe] {total - len(todo)} of {total} edits already done; {len(todo)} to run -> {opts.out}")
    failed: dict = {}
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, not {workers}")
    if ray_address is not None and workers > 1:
        raise ValueError("--workers and --ray both spread the edits: give one of them")
    if ray_address is not None and todo:
        failed = _run_with_ray(todo, opts, ray_address)
    elif workers > 1 and len(todo) > 1:
        failed = _run_in_processes(todo, opts, workers)
    else:
        models = load_models(opts) if todo else {}
        for i, (edit, obj, method, seed) in enumerate(todo, 1):
            print(f"[noe] ({i}/{len(todo)}) {method} :: {seeded(edit['id'], seed)}: "
                  f"'{edit['source_prompt']}' -> '{edit['target_prompt']}'")
            error, summary = _edit_and_summarise(edit, obj, method, opts, models, seed)
            print(f"[noe]   {summary or 'skipped: ' + error}")
            if error:
                failed[f"{method}/{seeded(edit['id'], seed)}"] = error
    record_failures(opts.out, failed, [f"{m}/{seeded(e['id'], s)}" for e, _, m, s in todo])
    pages = write_leaderboards(opts.out, manifest_name=manifest.get("name", "noe"), reported=opts.reported)
    print(f"[noe] leaderboards: {pages['markdown']} and {pages['html']}")
    return {"done": total - len(todo), "ran": len(todo) - len(failed), "failed": failed, **pages}


FAILURES_FILE = "failed.json"


def record_failures(out: Path, failed: dict, attempted: list[str]) -> None:
    """OUT/failed.json: the edits that could not run, with why (the error's last line); an edit that ran this
    time leaves it, one not attempted keeps its entry."""
    path = Path(out) / FAILURES_FILE
    kept = json.loads(path.read_text()) if path.is_file() else {}
    kept = {k: v for k, v in kept.items() if k not in attempted}
    kept.update({k: {"why": v, "on": time.strftime("%Y-%m-%d %H:%M")} for k, v in failed.items()})
    if kept or path.is_file():
        atomic_write_json(path, kept)


def _edit_and_summarise(edit: dict, obj: dict, method: str, opts: RunOptions, models: dict,
                        seed: int) -> tuple[Optional[str], str]:
    """Run one edit: (None, what it measured) or (why it did not run: the error's last line, ''). An unexpected
    error is the edit's own failure, never the run's: the other edits go on."""
    import traceback

    try:
        r = run_one(edit, obj, method, opts, models, seed)
    except NotAvailable as exc:
        return str(exc), ""
    except Exception as exc:
        lines = traceback.format_exception_only(type(exc), exc)
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
        return lines[-1].strip().splitlines()[-1][:500] + at, ""
    m = r["metrics"]
    return None, f"done{_took(r)}: " + ", ".join(
        f"{k} {m[k]:.4g}" for k in ("clip_score", "judge_score", "lpips", "psnr") if k in m)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(opts: RunOptions) -> int:
    """Edits at once when --workers is not given: the toy preset's small tensors leave a second thread of one
    process half idle, so on CPU one one-thread worker per core (at most 4; measured with 2 on 2 cores) runs
    more edits an hour, in nerfstudio and in threestudio (whose launch.py takes its worker's thread count).
    Full sizes run one edit at a time."""
    if opts.preset == "toy" and opts.device == "cpu":
        return max(1, min(available_cores(), 4))
    return 1


def _took(result: dict) -> str:
    if result.get("resumed_after_steps"):
        return f" (resumed after {result['resumed_after_steps']} steps; {result['wall_time_after_resume_s']} s more)"
    return f" in {result['wall_time_s']} s"


def _worker_start(threads: int, driver: int) -> None:
    """A worker dies with its driver, whatever kills the driver (no orphans that train on and collide with a
    rerun), and leaves Ctrl-C to the driver, which stops the pool."""
    import signal

    from piva.procs import die_with_parent

    die_with_parent(driver)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)


_WORKER_MODELS: dict = {}


def _worker_edit(edit: dict, obj: dict, method: str, opts: RunOptions, seed: int) -> tuple[Optional[str], str]:
    """One edit in a worker process: (None, what it measured) or (why it could not run, '')."""
    if not _WORKER_MODELS:
        _WORKER_MODELS.update(models=load_models(opts))
    return _edit_and_summarise(edit, obj, method, opts, _WORKER_MODELS["models"], seed)


def _worker_prepare(obj: dict, opts: RunOptions, splats: bool) -> Optional[str]:
    """One object's source scene in a worker process: None, or why it could not be prepared."""
    try:
        if opts.backend == "threestudio":
            ThreestudioBackend(opts).source(obj)
        else:
            prepare_object(obj, opts.prepare, splats=splats)
    except Exception as exc:  # the object's edits meet the same error and record it as theirs
        return f"{type(exc).__name__}: {exc}"
    return None


def _run_in_processes(todo, opts: RunOptions, workers: int) -> dict:
    """`workers` edits at once, each process with an equal share of the CPU threads. Small toy-size tensors keep
    two threads of one process half idle: on 2 cores, two one-thread workers finish ~1.5x the edits an hour of
    one two-thread process (measured: 0.72 s a PiVa step each, side by side, against 0.54 s alone).
    Each result is stored by its worker as it finishes, so a killed run resumes as a sequential one does."""
    import concurrent.futures as cf
    import multiprocessing as mp
    from concurrent.futures.process import BrokenProcessPool

    workers = min(workers, len(todo))
    threads = max(1, available_cores() // workers)
    print(f"[noe] {workers} worker processes, {threads} CPU thread(s) each")
    failed = {}
    pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_start,
                                  initargs=(threads, os.getpid()))
    try:
        # The source scenes go first in the queue, one object per job: edits come object by object, so a
        # worker would otherwise wait on another's preparation lock at every new object. No barrier: a worker
        # done with its scenes takes the first edits, whose scenes are ready by then.
        scenes = {(obj["id"], method_variant(method)[0] in SPLAT_METHODS): obj for _, obj, method, _ in todo}
        print(f"[noe] the source scenes of {len(scenes)} object(s) first (kept when done)", flush=True)
        preparing = {pool.submit(_worker_prepare, obj, opts, splats): name for (name, splats), obj in scenes.items()}
        jobs = {pool.submit(_worker_edit, edit, obj, method, opts, seed): (edit, method, seed)
                for edit, obj, method, seed in todo}
        for i, job in enumerate(cf.as_completed(jobs), 1):
            edit, method, seed = jobs[job]
            try:
                error, summary = job.result()
            except BrokenProcessPool:
                error, summary = "a worker process died (killed, or out of memory): run again to resume", ""
            name = f"{method}/{seeded(edit['id'], seed)}"
            print(f"[noe] ({i}/{len(todo)}) {name}: " + (f"skipped: {error}" if error else summary), flush=True)
            if error:
                failed[name] = error
        for job, name in preparing.items():  # its edits have recorded why they were skipped
            why = job.exception() or job.result()
            if why:
                print(f"[noe] {name}: not prepared: {why}", flush=True)
    except KeyboardInterrupt:  # stop within seconds: the workers ignore Ctrl-C, so end them here
        print("[noe] interrupted: stopping the workers (finished edits are kept; run again to resume)", flush=True)
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)
    return failed


def _stop_pool(pool) -> None:
    """End a process pool now: its queued jobs cancelled, its workers killed (an edit resumes from its
    latest checkpoint on the next run). Every child process counts, not only those the pool lists: a Ctrl-C
    during a submit can land while a worker is started but not yet listed, and the interpreter's exit would
    then wait for that worker's whole edit (it ignores Ctrl-C)."""
    import multiprocessing as mp

    processes = set((getattr(pool, "_processes", None) or {}).values()) | set(mp.active_children())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.kill()
    for p in processes:
        p.join(timeout=10)


RAY_RETRIES = 3
"""How often Ray runs an edit again after its node or worker process died; each run resumes from the edit's newest
checkpoint in `--out`, so a node lost mid-edit costs the steps since that checkpoint."""


def ray_nodes_see_out(ray, out: Path, timeout: float = 120.0) -> None:
    """Every Ray node that can run edits must see `--out` at the same path: the source scenes, each edit's
    checkpoints (what a retried edit resumes from on another node) and the results live there. Checked at start by
    a probe task on each node (a file the driver wrote); a node that cannot see it stops the run with one line."""
    import socket
    import uuid

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = Path(out) / ".ray-probe" / f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    token.parent.mkdir(parents=True, exist_ok=True)
    token.write_text("piva")

    @ray.remote(num_cpus=0, max_retries=0)
    def probe(path: str) -> tuple[str, bool]:
        import socket as s

        return s.gethostname(), Path(path).is_file()

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(str(token)): n for n in nodes}
    try:
        for ref, node in refs.items():
            host, seen = ray.get(ref, timeout=timeout)
            if not seen:
                raise SystemExit(f"piva: error: Ray node {node['NodeManagerAddress']} ({host}) cannot see --out "
                                 f"{Path(out).resolve()}: mount it at the same path on every node (NFS or another "
                                 "shared file system); source scenes, checkpoints and results live there")
    finally:
        token.unlink(missing_ok=True)


def _run_with_ray(todo, opts: RunOptions, address: str) -> dict:
    """One edit per Ray task (one GPU each on a GPU preset), on a shared `--out` (`ray_nodes_see_out`). A task whose
    node dies is run again on another node (`RAY_RETRIES`) and resumes from its newest checkpoint; an edit that
    runs out of retries is recorded as failed, and the others go on."""
    try:
        import ray
    except ImportError:
        raise SystemExit("piva: error: --ray needs Ray (pip install -e '.[ray]' -c requirements/cpu-constraints.txt); "
                         "leave --ray out to run locally")
    ray.init(address=None if address == "local" else address)
    ray_nodes_see_out(ray, opts.out)
    gpus = 1 if opts.device.startswith("cuda") else 0

    @ray.remote(num_gpus=gpus, max_retries=RAY_RETRIES, retry_exceptions=False)
    def task(edit, obj, method, seed):
        key = f"{method}/{seeded(edit['id'], seed)}"
        # Where each try ran: a node lost mid-edit shows as two entries.
        log = Path(opts.out) / "ray-tasks" / f"{key}.json"
        tries = json.loads(log.read_text()) if log.is_file() else []
        atomic_write_json(log, tries + [{"node_id": ray.get_runtime_context().get_node_id(),
                                         "host": platform.node(), "pid": os.getpid(), "started": time.time()}])
        if not _WORKER_MODELS:  # once per Ray worker process, not per task
            _WORKER_MODELS.update(models=load_models(opts))
        error, _ = _edit_and_summarise(edit, obj, method, opts, _WORKER_MODELS["models"], seed)
        return (key, error) if error else (None, None)

    refs = {task.remote(e, o, m, s): f"{m}/{seeded(e['id'], s)}" for e, o, m, s in todo}
    failed = {}
    for ref, name in refs.items():
        try:
            key, value = ray.get(ref)
        except ray.exceptions.RayError as exc:  # its node or worker died more than RAY_RETRIES times
            key, value = name, f"lost on Ray after {RAY_RETRIES + 1} tries: {str(exc).strip().splitlines()[0]}"
        if key is not None:
            failed[key] = value
    return failed
