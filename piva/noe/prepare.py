"""Noe data preparation: get each object, render 100 views, write a Blender dataset, train the source scene.

Offline it says what it cannot fetch and carries on with what is local. A local
mesh (`source: local`, `path: mesh.glb`) or a local dataset folder can stand in for
any download: `--objaverse-dir DIR` (DIR/<uid>.glb) and `--nerf-synthetic-dir DIR`
(DIR/<scene>/transforms_train.json).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from piva.nerfstudio.runs import CaptureScene, ObjectScene, RunSize, colmap_model
from piva.noe.presets import Preset, get_preset

DISTANCE, FOV_Y, ELEVATION = 4.0, 50.0, (5.0, 85.0)
# Noe's meshes fill the paper's radius-2 sphere; seen from 4 at fov 50 that sphere is wider than the frame,
# so parts of them leave every view. A user's mesh is scaled to the largest sphere the frame holds whole.
NOE_RADIUS = 2.0
FRAME_RADIUS = round(0.95 * DISTANCE * float(np.sin(np.radians(FOV_Y / 2))), 3)


def mesh_radius(obj: dict) -> float:
    """Noe's protocol for its objects; wholly in frame for a user's."""
    return NOE_RADIUS if obj["source"] == "objaverse" else FRAME_RADIUS


class NotAvailable(RuntimeError):
    """An object that cannot be fetched or found locally."""


@dataclass
class PrepareOptions:
    root: Path
    preset: Union[str, Preset] = "full"
    nerf_synthetic_dir: Optional[Path] = None
    objaverse_dir: Optional[Path] = None
    download: bool = True
    source_steps: Optional[int] = None

    @property
    def sizes(self) -> Preset:
        return get_preset(self.preset) if isinstance(self.preset, str) else self.preset

    @property
    def run_size(self) -> RunSize:
        size = self.sizes.run
        return size if self.source_steps is None else dataclasses.replace(size, source_steps=self.source_steps)

    def run_size_for(self, obj: dict) -> RunSize:
        """`run_size`, with a captured scene's own source length (the preset's `capture_source_steps`)."""
        steps = self.sizes.capture_source_steps
        if obj["source"] != "capture" or self.source_steps is not None or steps is None:
            return self.run_size
        return dataclasses.replace(self.run_size, source_steps=steps)


def toy_object_scene(data: Path) -> ObjectScene:
    """A toy-world dataset as nerfstudio sees it: RGB on the toy grey, cameras at distance 3.6."""
    from piva.toyworld.scenes import BACKGROUND

    return ObjectScene(Path(data), backdrop=(BACKGROUND,) * 3, near=1.5, far=6.0, rgba=False)


def object_scene(obj: dict, data: Path) -> Union[ObjectScene, CaptureScene]:
    """Noe and NeRF-synthetic objects are RGBA on white within radius 2, seen from distance 4; a capture is
    read by nerfstudio's own parser."""
    if obj["source"] == "toyworld":
        return toy_object_scene(data)
    if obj["source"] == "capture":
        return CaptureScene(Path(data), downscale=obj.get("downscale", 1), eval_every=obj.get("eval_every", 8))
    return ObjectScene(Path(data), backdrop=(1.0, 1.0, 1.0), near=0.5, far=8.0, rgba=True)


def object_dir(root: Path, obj: dict) -> Path:
    return Path(root) / "objects" / obj["id"]


def _online(host: Optional[str] = None) -> bool:
    """HF_HUB_OFFLINE off and `host` (default: the Hugging Face endpoint, where Objaverse lives) answers."""
    from piva.prior.loading import _hub_reachable, hf_offline

    return not hf_offline() and _hub_reachable(host=host)


def find_mesh(obj: dict, opts: PrepareOptions) -> Path:
    """The object's mesh file: local path, --objaverse-dir, the objaverse cache, or a download."""
    if obj["source"] == "local":
        p = Path(obj["path"]).expanduser()
        if not p.exists():
            raise NotAvailable(f"local object path {p} does not exist")
        return p
    uid = obj["uid"]
    candidates = []
    if opts.objaverse_dir:
        candidates.append(Path(opts.objaverse_dir) / f"{uid}.glb")
    candidates += [Path(p) for p in glob.glob(os.path.expanduser(f"~/.objaverse/hf-objaverse-v1/glbs/*/{uid}.glb"))]
    for c in candidates:
        if c.is_file():
            return c
    if not opts.download:
        raise NotAvailable(f"objaverse {uid}: not in --objaverse-dir or ~/.objaverse, and downloads are off")
    try:
        import objaverse
    except ImportError:
        raise NotAvailable(f"objaverse {uid}: not local, and the `objaverse` package is not installed (pip install objaverse)")
    if not _online():
        raise NotAvailable(f"objaverse {uid}: not local, and the Objaverse host cannot be reached (offline)")
    got = objaverse.load_objects(uids=[uid], download_processes=1)
    if uid not in got:
        raise NotAvailable(f"objaverse {uid}: download failed")
    return Path(got[uid])


def find_nerf_synthetic(obj: dict, opts: PrepareOptions) -> Path:
    """A NeRF-synthetic scene folder (its own 100 training views are used as they are)."""
    scene = obj["scene"]
    roots = [Path(opts.nerf_synthetic_dir)] if opts.nerf_synthetic_dir else []
    roots.append(Path(opts.root) / "nerf-synthetic")
    for r in roots:
        for d in (r / scene, r / "blender" / scene):
            if (d / "transforms_train.json").is_file():
                return d
    if not opts.download:
        raise NotAvailable(f"nerf-synthetic '{scene}': not in --nerf-synthetic-dir and downloads are off")
    if not _online("drive.google.com"):
        raise NotAvailable(f"nerf-synthetic '{scene}': not local, and offline (pass --nerf-synthetic-dir DIR)")
    save = Path(opts.root) / "nerf-synthetic"
    done = subprocess.run(["ns-download-data", "blender", "--save-dir", str(save)], capture_output=True, text=True, timeout=3600)
    for d in (save / "blender" / scene, save / scene):
        if (d / "transforms_train.json").is_file():
            return d
    raise NotAvailable(f"nerf-synthetic '{scene}': ns-download-data failed: {done.stderr.strip().splitlines()[-1:] }")


def hemisphere_views(n: int, size: int, seed: float = 0.0):
    """n cameras on the upper hemisphere at the protocol's distance and fov, evenly spread (Fibonacci)."""
    from piva.data.views import Camera, look_at

    golden = np.degrees(np.pi * (3 - np.sqrt(5)))
    lo, hi = np.sin(np.radians(ELEVATION[0])), np.sin(np.radians(ELEVATION[1]))
    cams = []
    for i in range(n):
        el = np.degrees(np.arcsin(lo + (hi - lo) * (i + 0.5) / n))
        az = (i * golden + seed) % 360
        cams.append(Camera(look_at(az, el, DISTANCE), FOV_Y, size, size))
    return cams


def posed_images(obj: dict) -> Path:
    """A user's folder of posed images (Blender/nerfstudio layout), used as it is, like NeRF-synthetic."""
    folder = Path(obj["path"]).expanduser()
    if not (folder / "transforms_train.json").is_file():
        raise NotAvailable(f"local folder {folder} has no transforms_train.json: give a mesh file (.obj/.glb/.ply) "
                           "or a Blender-layout dataset (transforms_train.json + images; transforms_test.json "
                           "for the no-edit reconstruction figures)")
    return folder


def capture_folder(obj: dict, opts: PrepareOptions) -> Path:
    """A capture's folder, with its downscaled images made when missing (nerfstudio would stop to ask). A
    `generate: toyworld` capture is written on first use, in the object's own folder."""
    if obj.get("generate") == "toyworld":
        folder = object_dir(opts.root, obj) / "capture"
        if not (folder / "transforms.json").is_file():
            from piva.toyworld.capture import write_capture
            from piva.toyworld.scenes import Scene

            write_capture(Scene.from_caption(obj["source_prompt"]), folder)
    else:
        folder = Path(obj["path"]).expanduser()
    if not (folder / "transforms.json").is_file() and colmap_model(folder) is None:
        where = f" (the data: {obj['url']})" if obj.get("url") else ""
        raise NotAvailable(f"capture {obj['id']}: {folder} has no transforms.json and no COLMAP model{where}; make it "
                           f"from photos or a video with `ns-process-data images --data PHOTOS --output-dir {folder}`")
    if obj.get("downscale", 1) > 1:
        downscaled_images(folder, obj["downscale"])
    return folder


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def capture_frames(folder: Path) -> dict[Path, Path]:
    """Each frame of a capture -> where nerfstudio reads it at 1/f size, relative to `images_<f>/`: its file name
    (transforms.json), or its path under images/ (COLMAP)."""
    if (folder / "transforms.json").is_file():
        return {Path(f["file_path"]): Path(Path(f["file_path"]).name)
                for f in json.loads((folder / "transforms.json").read_text())["frames"]}
    return {p.relative_to(folder): p.relative_to(folder / "images") for p in sorted((folder / "images").rglob("*"))
            if p.suffix.lower() in IMAGE_SUFFIXES}


def downscaled_images(folder: Path, factor: int) -> Path:
    """`images_<factor>/` as nerfstudio reads it (size floor(w/f) x floor(h/f)), made from the frames when missing
    or incomplete, averaged over each f x f block."""
    from PIL import Image

    from piva.io import atomic_path

    frames = capture_frames(folder)
    out = folder / f"images_{factor}"
    if all((out / small).is_file() for small in frames.values()):
        return out
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for f, small_name in frames.items():
            src = folder / f
            if not src.is_file():
                raise NotAvailable(f"capture {folder}: frame {f} is listed but missing")
            (tmp / small_name).parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as im:
                small = im.convert("RGB").resize((im.width // factor, im.height // factor), Image.Resampling.BOX)
                small.save(tmp / small_name, **({"quality": 95} if f.suffix.lower() in (".jpg", ".jpeg") else {}))
    print(f"[noe] made {out} ({len(frames)} frames at 1/{factor} size)")
    return out


def capture_settings(obj: dict, folder: Path) -> dict:
    """What a capture's source scene is made from: its frames' poses (transforms.json) and the size read."""
    from piva.io import file_fingerprint

    poses = folder / "transforms.json"
    if not poses.is_file():  # COLMAP: its images file holds every pose
        model = folder / colmap_model(folder)
        poses = model / "images.bin" if (model / "images.bin").is_file() else model / "images.txt"
    return {"source": "capture", "path": str(folder), "poses": file_fingerprint(poses),
            "downscale": obj.get("downscale", 1), "eval_every": obj.get("eval_every", 8)}


def dataset_settings(obj: dict, opts: PrepareOptions) -> dict:
    """What an object's rendered dataset is made from: a dataset made otherwise is rendered again."""
    common = {"source": obj["source"], "views": opts.sizes.capture_views, "size": opts.sizes.capture_size}
    if obj["source"] == "toyworld":
        return {**common, "caption": obj["source_prompt"], "val_views": 4, "seed": 0}
    return {**common, "object": obj.get("uid") or obj.get("path"), "radius": mesh_radius(obj), "distance": DISTANCE,
            "fov_y": FOV_Y}


DATASET_RECORD = "piva_dataset.json"


def write_dataset(obj: dict, opts: PrepareOptions) -> Path:
    """The object's Blender dataset (rendered here, or the NeRF-synthetic folder itself). A rendered dataset
    records what it was made from; one made with other settings (preset, views, size) is rendered again and
    swapped in whole."""
    from piva.data.views import hemisphere_cameras, write_blender_dataset
    from piva.io import atomic_path, atomic_write_json

    if obj["source"] == "nerf-synthetic":
        return find_nerf_synthetic(obj, opts)
    if obj["source"] == "capture":
        return capture_folder(obj, opts)
    if obj["source"] == "local" and Path(obj["path"]).expanduser().is_dir():
        return posed_images(obj)
    out = object_dir(opts.root, obj) / "data"
    wanted = dataset_settings(obj, opts)
    record = out / DATASET_RECORD
    if (out / "transforms_train.json").is_file() and record.is_file() and json.loads(record.read_text()) == wanted:
        return out
    n, size = opts.sizes.capture_views, opts.sizes.capture_size
    shutil.rmtree(out.with_name("data.partial"), ignore_errors=True)  # left by an earlier version
    with atomic_path(out) as tmp:  # a half-written dataset is never taken for a finished one
        if obj["source"] == "toyworld":
            from piva.toyworld.scenes import Scene, write_blender_dataset as write_toy

            write_toy(Scene.from_caption(obj["source_prompt"]), tmp, n_train=n, n_val=4, size=size, seed=0)
        else:
            from piva.data.mesh import load_meshes, normalize_to_sphere, render_mesh

            mesh_path = find_mesh(obj, opts)
            radius = mesh_radius(obj)
            meshes = normalize_to_sphere(load_meshes(mesh_path), radius=radius)
            splits = {"train": hemisphere_views(n, size), "val": hemisphere_cameras(4, size, FOV_Y, DISTANCE, seed=1),
                      "test": hemisphere_cameras(4, size, FOV_Y, DISTANCE, seed=2)}
            write_blender_dataset(tmp, splits, lambda cam: render_mesh(meshes, cam), rgba=True, progress=True,
                                  meta={"object": obj["id"], "mesh": str(mesh_path), "radius": radius,
                                        "distance": DISTANCE, "fov_y": FOV_Y, "size": size})
        atomic_write_json(tmp / DATASET_RECORD, wanted)
    return out


def source_settings(obj: dict, data: Path, opts: PrepareOptions, splats: bool) -> dict:
    """What a source scene is made from: its dataset and the reconstruction's sizes and model."""
    from piva.nerfstudio.runs import CPU_FIELD, CPU_SPLATS

    record = Path(data) / DATASET_RECORD
    size = opts.run_size_for(obj)
    if obj["source"] == "capture":
        data_settings = capture_settings(obj, Path(data))
    else:
        data_settings = json.loads(record.read_text()) if record.is_file() else str(data)
    return {"data": data_settings,
            "model": "splatfacto" if splats else "nerfacto", "steps": size.source_steps,
            "rays_per_batch": size.source_rays_per_batch,
            "cpu_field": (CPU_SPLATS if splats else CPU_FIELD) if size.cpu_field else None}


def train_source(obj: dict, data: Path, opts: PrepareOptions, splats: bool = False) -> Path:
    """Reconstruct the source scene with nerfacto (splatfacto with `splats`); returns its `nerfstudio_models`
    folder (skips when done). Each setting of the reconstruction has a folder of its own
    (runs/<settings key>), so a changed step count or preset trains anew instead of reusing another's."""
    from piva.io import settings_key
    from piva.nerfstudio.runs import reconstruct

    if splats and obj["source"] == "capture":
        raise NotAvailable(f"capture {obj['id']}: the splat methods start from random Gaussians inside an object's "
                           "sphere, not from a capture's SfM points: use piva, dds or sds on captures")
    key = settings_key(**source_settings(obj, data, opts, splats))
    runs_dir = object_dir(opts.root, obj) / ("splat-runs" if splats else "runs") / key
    return reconstruct(object_scene(obj, data), runs_dir, opts.run_size_for(obj), splats=splats) / "nerfstudio_models"


def prepare_object(obj: dict, opts: PrepareOptions, train: bool = True, splats: bool = False) -> dict:
    """Dataset + source scene of one object (nerfacto; also splatfacto with `splats`); the record is kept
    in objects/<id>/prepared.json, with a fingerprint of each source checkpoint (what an edit is made from).

    A file lock makes parallel workers (Ray tasks, several runners) wait for one
    another instead of preparing the same object twice.
    """
    from filelock import FileLock

    from piva.io import atomic_write_json, file_fingerprint
    from piva.nerfstudio.runs import latest_checkpoint

    folder = object_dir(opts.root, obj)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".prepare.lock")):
        data = write_dataset(obj, opts)
        kept = folder / "prepared.json"
        record = json.loads(kept.read_text()) if kept.is_file() else {}
        record.update({"object": obj["id"], "data": str(data), "preset": opts.sizes.name})
        if train:
            key = "splat_source_checkpoints" if splats else "source_checkpoints"
            models = train_source(obj, data, opts, splats=splats)
            record[key] = str(models)
            record[key.replace("checkpoints", "fingerprint")] = file_fingerprint(latest_checkpoint(models))
        atomic_write_json(kept, record)
    return record


def prepare(manifest: dict, opts: PrepareOptions, object_ids: Optional[list] = None, train: bool = True) -> dict:
    """Prepare every (selected) object; returns {id: record or {'unavailable': reason}} and carries on past misses."""
    status = {}
    for obj in manifest["objects"]:
        if object_ids and obj["id"] not in object_ids:
            continue
        try:
            status[obj["id"]] = prepare_object(obj, opts, train=train)
        except NotAvailable as exc:
            print(f"[noe] skipped {obj['id']}: {exc}")
            status[obj["id"]] = {"unavailable": str(exc)}
    return status

