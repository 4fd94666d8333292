"""threestudio as a backend of `benchmark/run.py` (issue: Noe with the paper's own set-up).

Each step is threestudio's own `launch.py` in a subprocess, with the extension's
configs: the source scene from the prepared views, then the edit, whose test stage
renders the 120 Noe cameras of the edited AND the original field. The benchmark
evaluates those PNGs with piva.metrics, like the nerfstudio backend's renders.
On a machine without CUDA (the toy preset, tests) launch.py runs through
`python -m piva.threestudio.cpu`, which puts pure-torch stand-ins in its place.

A stopped run resumes: the configs save a checkpoint every N steps (`checkpoint_interval`), only the newest
is kept, and the commands pass `resume=` the newest one that loads (a kill can cut a file short).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from piva.procs import preexec_die_with_parent
from piva.threestudio.install import EXTENSION_DIR, InstallError, check_checkout

CONFIGS = {"source": "source-noe.yaml", "piva": "piva-noe.yaml", "dds": "dds-noe.yaml", "sds": "dds-noe.yaml"}
CHECKPOINT_EVERY = 1000
"""The configs' `checkpoint.every_n_train_steps`: a killed full-size run loses at most this many steps."""
GPU_PEAK_FILE = "piva-peak-memory.json"
"""Written into a trial's save/ by the extension's edit system on a GPU: its own peak GPU memory."""


def checkpoint_interval(steps: int) -> int:
    """Steps between saved checkpoints of a run of `steps`: about four saves in a short one (a 60-step toy edit:
    every 15), every CHECKPOINT_EVERY in a long one (each save of a full-size edit writes ~0.3 GB)."""
    return max(1, min(CHECKPOINT_EVERY, int(steps) // 4))


def check_backend(root: Optional[Path]) -> Path:
    """The threestudio checkout with the extension installed, or a one-line exit saying what to do."""
    if root is None:
        raise SystemExit("piva: error: --backend threestudio needs --threestudio PATH (your threestudio checkout)")
    root = Path(root).expanduser().resolve()
    try:
        check_checkout(root)
    except InstallError as exc:
        raise SystemExit(f"piva: error: {exc}")
    if not (root / "custom" / EXTENSION_DIR / "configs").is_dir():
        raise SystemExit(f"piva: error: the piva extension is not in {root}/custom: run python -m piva.threestudio.install {root}")
    return root


@dataclass(frozen=True)
class LaunchSettings:
    """What a caller changes in the extension's configs: sizes and the device, and the object's inputs.

    None keeps the config's value (the paper's). Every field maps to config keys in `source_overrides`
    and `edit_overrides`; the method's own settings are not among them."""

    device: str = "cuda"
    """cpu: launch.py through `python -m piva.threestudio.cpu` (pure-torch stand-ins)."""
    source_steps: Optional[int] = None
    source_rays_per_batch: Optional[int] = None
    samples_per_ray: Optional[int] = None
    """The volume renderer's samples along the grid's diagonal (paper: 512)."""
    edit_steps: Optional[int] = None
    anneal_step: Optional[int] = None
    render_size: Optional[int] = None
    """Side of the views the diffusion model sees during the edit (paper: 512)."""
    eval_size: Optional[int] = None
    eval_views: Optional[int] = None
    # inputs
    background: Optional[Sequence[float]] = None
    """The object's backdrop (RGB); the paper's objects are on white."""
    capture: Optional[dict] = None
    """{"distance", "fov_y"}: edit cameras at the capture's distance and fov instead of the paper's ranges."""
    model: Optional[str] = None
    controlnet: Optional[str] = None
    checkpoint_every: Optional[int] = None
    """Steps between saved checkpoints; None: `checkpoint_interval` of the steps set here, else the configs' 1000."""

    def _checkpoints(self, steps: Optional[int]) -> dict:
        every = self.checkpoint_every or (checkpoint_interval(steps) if steps else None)
        return {"checkpoint.every_n_train_steps": str(every)} if every else {}

    def _common(self) -> dict:
        out = {}
        if self.samples_per_ray:
            out["system.renderer.num_samples_per_ray"] = str(self.samples_per_ray)
        if self.background is not None:
            out["system.background.color"] = _floats(self.background)
        return out

    def source_overrides(self) -> dict:
        out = self._common()
        if self.source_steps:
            out["trainer.max_steps"] = str(self.source_steps)
        out.update(self._checkpoints(self.source_steps))
        if self.source_rays_per_batch:
            out["data.rays_per_batch"] = str(self.source_rays_per_batch)
        if self.background is not None:
            out["data.background_color"] = _floats(self.background)
        return out

    def edit_overrides(self) -> dict:
        out = self._common()
        if self.edit_steps:
            out["trainer.max_steps"] = str(self.edit_steps)
        out.update(self._checkpoints(self.edit_steps))
        if self.anneal_step is not None:
            out["system.guidance.anneal_step"] = str(self.anneal_step)
        if self.render_size:
            out.update({"data.width": str(self.render_size), "data.height": str(self.render_size)})
        if self.eval_size:
            out.update({"data.eval_width": str(self.eval_size), "data.eval_height": str(self.eval_size)})
        if self.eval_views:
            out["data.n_test_views"] = str(self.eval_views)
        if self.capture:
            out["data.camera_distance_range"] = _floats([self.capture["distance"]] * 2)
            out["data.fovy_range"] = _floats([self.capture["fov_y"]] * 2)
        if self.model:
            out["system.guidance.pretrained_model_name_or_path"] = str(self.model)
        if self.controlnet:
            out["system.guidance.controlnet_name_or_path"] = str(self.controlnet)
        return out


def _floats(values: Sequence[float]) -> str:
    return "[" + ",".join(f"{v:g}" for v in values) + "]"


def launcher(device: str = "cuda") -> list[str]:
    """How launch.py is started: as itself on a GPU, through piva's CPU stand-ins elsewhere."""
    if device == "cpu":
        return [sys.executable, "-m", "piva.threestudio.cpu", "launch.py"]
    return [sys.executable, "launch.py"]


def _launch(root: Path, config: str, overrides: dict, out: Path, device: str = "cuda") -> list[str]:
    args = launcher(device) + ["--config", f"custom/{EXTENSION_DIR}/configs/{config}", "--train", "--gpu", "0"]
    base = {"exp_root_dir": str(out), "use_timestamp": "false"}
    return args + [f"{k}={v}" for k, v in {**base, **overrides}.items()]


def source_command(root: Path, data: Path, out: Path, object_id: str,
                   settings: LaunchSettings = LaunchSettings()) -> tuple[list[str], Path]:
    """Command that fits the source scene; returns it and the trial folder it writes."""
    data, out = Path(data).resolve(), Path(out).resolve()  # launch.py runs in the threestudio checkout
    trial = out / "piva-source-noe" / object_id
    overrides = {"data.dataroot": str(data), "tag": object_id, **settings.source_overrides()}
    cmd = _launch(root, CONFIGS["source"], overrides, out, settings.device)
    return cmd + _resume(trial), trial


def edit_command(root: Path, method: str, source_ckpt: Path, edit: dict, out: Path, steps: Optional[int] = None,
                 eval_orbit: Optional[dict] = None, settings: LaunchSettings = LaunchSettings(), seed: int = 0):
    """Command that edits (then renders the test cameras); returns it and the trial folder.

    `eval_orbit` ({"elevation", "distance", "fov_y"}) replaces the config's Noe evaluation orbit,
    so that an object is evaluated as it was captured (benchmark presets, a user's objects)."""
    name = "piva-noe" if method == "piva" else "dds-noe"
    source_ckpt, out = Path(source_ckpt).resolve(), Path(out).resolve()  # launch.py runs in the threestudio checkout
    tag = f"{edit['id']}-{method}" + (f"-seed{seed}" if seed else "")
    trial = out / name / tag
    overrides = {
        "system.geometry_convert_from": str(source_ckpt),
        "system.guidance.source_prompt": _quote(edit["source_prompt"]),
        "system.guidance.target_prompt": _quote(edit["target_prompt"]),
        "tag": tag,
        **settings.edit_overrides(),
    }
    if method == "sds":
        # SDS shares the DDS config; its guidance returns loss_sds, which the system weights by lambda_sds.
        overrides["system.guidance.mode"] = "sds"
        overrides["system.loss.lambda_sds"] = "1."
    if seed:  # the configs' own seed is 0
        overrides["seed"] = str(seed)
    if steps:
        overrides["trainer.max_steps"] = str(steps)
        overrides.update(settings._checkpoints(steps))
    if eval_orbit:
        overrides.update({"data.eval_elevation_deg": f"{eval_orbit['elevation']:g}",
                          "data.eval_camera_distance": f"{eval_orbit['distance']:g}",
                          "data.eval_fovy_deg": f"{eval_orbit['fov_y']:g}"})
    cmd = _launch(root, CONFIGS[method], overrides, out, settings.device)
    return cmd + _resume(trial), trial


def checkpoint_step(path: Path) -> Optional[int]:
    """The global step a checkpoint was saved at, or None when it does not load: Lightning writes a checkpoint
    in place where fsspec cannot rename a temporary file over it (Lightning 2.0, a temp dir on another disk),
    so a kill mid-write leaves a file cut short. Cheap: the tensors are mapped, not read."""
    try:
        if not zipfile.is_zipfile(path):  # cut short: no central directory at the end
            return None
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        return int(ckpt["global_step"])
    except Exception:  # noqa: BLE001 - anything that does not load is not a checkpoint to resume from
        return None


def latest_checkpoint(trial: Path) -> Optional[Path]:
    """The trial's checkpoint at the highest step that loads (`last.ckpt` at a tie: the name the README gives);
    `last-v1.ckpt` appears when a run resumes with another checkpoint interval (Lightning keys its callback's
    state by it)."""
    found = []
    for path in (trial / "ckpts").glob("*.ckpt"):
        step = checkpoint_step(path)
        if step is not None:
            found.append((step, path.name.startswith("last"), path.stat().st_mtime_ns, path))
    return max(found)[-1] if found else None


def keep_newest_checkpoint(trial: Path) -> Optional[Path]:
    """Remove every file in the trial's ckpts/ but its newest complete checkpoint (and `last.ckpt`, a link to it):
    a file cut short, or the checkpoint a run resumed from, which Lightning never deletes. So a trial holds one
    checkpoint however often it is stopped. Returns that checkpoint."""
    latest = latest_checkpoint(trial)
    keep = latest.resolve() if latest is not None else None
    for path in (trial / "ckpts").glob("*.ckpt"):
        if path.resolve() != keep:  # links to the kept file stay; a dangling link resolves elsewhere
            path.unlink()
    return latest


def _resume(trial: Path) -> list[str]:
    """`resume=` the newest complete checkpoint, if any (a stopped run goes on from there)."""
    latest = keep_newest_checkpoint(trial)
    return [f"resume={latest}"] if latest is not None else []


def _quote(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'  # OmegaConf dotlist: quoted so commas and colons survive


def run(cmd: list[str], root: Path, trial: Optional[Path] = None, poll_s: float = 0.1) -> dict:
    """launch.py with this process's CPU thread count (a benchmark worker's share of the cores). It dies with
    this process (a killed worker leaves no training behind to collide with a rerun). Returns the launched
    process's own peak memory, {"process_peak_rss_mb"}: its VmHWM, read while it runs. Not wait4's ru_maxrss:
    the kernel carries the forking process's RSS over into the child's across exec, so that figure is never
    below this process's own (measured: 333 MB for `python -c pass` started from pytest).

    `trial`: its temporary files go to `trial/tmp` (emptied before and after), and it keeps only its newest
    checkpoint once the run has ended. Lightning (through fsspec) writes a checkpoint to a temporary file and
    moves it into place: beside the trial that move is an atomic rename, and a kill mid-write leaves its
    partial file there to be removed, not a few hundred MB in /tmp."""
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if trial is not None:
        scratch = Path(trial) / "tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        env["TMPDIR"] = str(scratch)
    proc = subprocess.Popen(cmd, cwd=root, env=env, preexec_fn=preexec_die_with_parent)
    peak_kib = None
    try:
        while True:
            seen = _peak_rss_kib(proc.pid)  # read before the wait: once ended, a process has no VmHWM
            peak_kib = max(peak_kib or 0, seen or 0)
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(poll_s)
    except BaseException:  # interrupted: the child goes too
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    if proc.returncode != 0:
        raise RuntimeError(f"threestudio exited with {proc.returncode}: {' '.join(cmd)}")
    if trial is not None:
        shutil.rmtree(scratch, ignore_errors=True)
        keep_newest_checkpoint(trial)
    if not peak_kib:
        return {"process_peak_rss_mb": None, "process_peak_note": "not measured: it ended before a reading"}
    return {"process_peak_rss_mb": round(peak_kib / 1024, 1)}


def _peak_rss_kib(pid: int) -> Optional[int]:
    """A running process's peak resident memory so far (Linux's VmHWM: its own address space's high-water mark)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def gpu_peak(trial: Path, since: float) -> dict:
    """The edit's own peak GPU memory, as its launch.py recorded it after the test renders
    (`torch.cuda.max_memory_allocated`) if it did so after `since` (time.time()); a missing record is said so,
    never replaced by this process's figure."""
    import json

    record = trial / "save" / GPU_PEAK_FILE
    if record.is_file() and record.stat().st_mtime >= since:
        return {"gpu_peak_mb": json.loads(record.read_text())["gpu_peak_mb"]}
    return {"gpu_peak_mb": None, "gpu_peak_note": f"not measured: launch.py wrote no {record}"}


def test_renders(trial: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The edited and original renders of the last test stage: [N,3,H,W] in [0,1], camera order."""
    import imageio.v3 as iio
    import numpy as np

    save = trial / "save"
    tests = sorted(save.glob("it*-test"), key=lambda p: int(p.name[2:].split("-")[0]))
    if not tests:
        raise FileNotFoundError(f"no it*-test folder in {save}: the edit's test stage did not run")
    edited_dir = tests[-1]
    original_dir = edited_dir.with_name(edited_dir.name + "-original")

    def load(folder: Path) -> torch.Tensor:
        files = sorted(folder.glob("*.png"), key=lambda p: int(p.stem))
        return torch.from_numpy(np.stack([iio.imread(f)[..., :3] for f in files])).permute(0, 3, 1, 2).float() / 255

    return load(edited_dir), load(original_dir)
