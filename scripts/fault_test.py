"""Kill the toy benchmark at random moments and check that nothing is lost, corrupt or counted twice.

    .venv/bin/python scripts/fault_test.py --kills 20        # prints a report; exits 1 on any fault

A short toy run (2 edits x no-edit and sds on one object, 2 workers) is run once uninterrupted, then again
in another folder while being stopped `--kills` times at random moments -- by turns SIGKILL of the whole
process group (driver and workers), SIGKILL of the driver alone (whose workers must then die by themselves)
and Ctrl-C (SIGINT) of the driver (which must stop within 10 s) -- and run to the end. After every kill: no process of the run is left, every JSON file parses, every
stored result is whole. At the end: the same results as the uninterrupted run (no-edit exactly; an sds
edit resumed from a checkpoint within `--tolerance-db` PSNR: a resumed run draws other noise), each edit's
checkpoints holding exactly its steps, and the same leaderboard rows.
tests/test_faults.py runs a few kills of it in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EDIT_STEPS = 4
KINDS = ("group", "driver", "interrupt")
"""SIGKILL of the process group (driver and workers), SIGKILL of the driver alone, SIGINT (Ctrl-C) of the driver."""


def args(edits: int = 2, source_steps: int = 150) -> list[str]:
    return ["--toy", "--limit", str(edits), "--methods", "no-edit,sds", "--source-steps", str(source_steps),
            "--edit-steps", str(EDIT_STEPS), "--eval-views", "9", "--workers", "2"]


def start(out: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "benchmark" / "run.py"), "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def group_alive(pgid: int) -> list[int]:
    """Processes still in the run's process group (workers, launch.py): none may outlive the run."""
    alive = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(proc.name))
    return alive


def run_to_end(out: Path, extra: list[str], timeout: float = 1200) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = start(out, extra)
    log = p.communicate(timeout=timeout)[0]
    if p.returncode != 0:
        raise RuntimeError(f"benchmark exited with {p.returncode}:\n{log[-3000:]}")
    return time.perf_counter() - t0, log


def problems_on_disk(out: Path) -> list[str]:
    """Corrupt JSON anywhere, results without their figures, checkpoints that do not load."""
    import torch

    found = []
    for path in out.rglob("*.json"):
        if any(part.startswith(".") for part in path.relative_to(out).parts):
            continue  # a temporary being written (atomic_path): never read as a result
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            found.append(f"{path}: not JSON ({exc})")
            continue
        if path.parent.parent.name == "results" and not {"metrics", "provenance"} <= set(data):
            found.append(f"{path}: a result without metrics or provenance")
    for path in out.rglob("step-*.ckpt"):
        try:
            torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # any failure to load is the fault this test looks for
            found.append(f"{path}: does not load ({type(exc).__name__})")
    return found


def results(out: Path) -> dict:
    return {str(p.relative_to(out / "results")): json.loads(p.read_text()) for p in (out / "results").glob("*/*.json")}


def compare(ref: Path, faulty: Path, tolerance_db: float) -> list[str]:
    """What differs between the uninterrupted and the interrupted run's results."""
    import torch

    from piva.nerfstudio.runs import latest_checkpoint
    from piva.nerfstudio.piva_pipeline import edit_start_step

    found = []
    a, b = results(ref), results(faulty)
    if set(a) != set(b):
        found.append(f"results differ: only uninterrupted {sorted(set(a) - set(b))}, only killed {sorted(set(b) - set(a))}")
    for name in sorted(set(a) & set(b)):
        ma, mb = a[name]["metrics"], b[name]["metrics"]
        tol = 1e-6 if a[name]["method"] == "no-edit" else tolerance_db
        for key in ("psnr",):
            if abs(ma[key] - mb[key]) > tol:
                found.append(f"{name}: {key} {mb[key]:.4f} (killed) vs {ma[key]:.4f}")
        if a[name]["method"] != "no-edit":
            run = Path(b[name]["edited_run"]) / "nerfstudio_models"
            last = latest_checkpoint(run)
            state = torch.load(last, map_location="cpu", weights_only=False)
            done = state["step"] - edit_start_step(state["pipeline"]) + 1
            if done != EDIT_STEPS:
                found.append(f"{name}: its run holds {done} edit steps, not {EDIT_STEPS}")
    rows = lambda out: [line.split("|")[1:3] for line in (out / "leaderboard.md").read_text().splitlines()  # noqa: E731
                        if line.startswith("| ") and "---" not in line]
    if rows(ref) != rows(faulty):
        found.append("the leaderboards' rows differ")
    return found


def fault_run(work: Path, kills: int, seed: int = 0, tolerance_db: float = 1.0, edits: int = 2,
              source_steps: int = 150, log=print) -> dict:
    """The uninterrupted run, then the killed one; returns the report (problems: empty when all is well)."""
    rng = random.Random(seed)
    extra = args(edits, source_steps)
    ref, faulty = work / "uninterrupted", work / "killed"
    took, _ = run_to_end(ref, extra)
    log(f"uninterrupted run: {took:.0f} s")
    problems, kinds = [], []
    for k in range(kills):
        p = start(faulty, extra)
        at = rng.uniform(2.0, 0.7 * took)  # a rerun repeats its start-up and whatever the kill lost
        kind = KINDS[k % len(KINDS)]
        deadline = time.perf_counter() + at
        while time.perf_counter() < deadline and p.poll() is None:
            time.sleep(0.1)
        if p.poll() is not None:
            log(f"kill {k + 1}: the run had finished before {at:.1f} s")
            p.communicate()
            kinds.append("finished first")
            continue
        sent = time.perf_counter()
        if kind == "group":
            os.killpg(p.pid, signal.SIGKILL)
        elif kind == "driver":
            p.kill()  # the driver alone: its workers must die by themselves
        else:
            p.send_signal(signal.SIGINT)  # Ctrl-C: the driver stops its pool and exits within seconds
        try:
            p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            problems.append(f"kill {k + 1} ({kind}) at {at:.1f} s: the driver did not stop within 30 s")
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
        kinds.append(kind)
        survivors = []
        for _ in range(100):  # the workers' watch notices within a second or two
            survivors = group_alive(p.pid)
            if not survivors:
                break
            time.sleep(0.1)
        stopped = time.perf_counter() - sent
        if kind == "interrupt" and stopped > 10:
            problems.append(f"kill {k + 1} (interrupt): the run took {stopped:.1f} s to stop")
        if survivors:
            problems.append(f"kill {k + 1} ({kinds[-1]}) at {at:.1f} s: {len(survivors)} process(es) survived it")
            for pid in survivors:
                os.kill(pid, signal.SIGKILL)
        problems += [f"kill {k + 1}: {x}" for x in problems_on_disk(faulty)]
        log(f"kill {k + 1}: {kinds[-1]} at {at:.1f} s; {len(results(faulty)) if (faulty / 'results').is_dir() else 0} "
            f"result(s) stored; problems so far: {len(problems)}")
    took2, _ = run_to_end(faulty, extra)
    log(f"final run after the kills: {took2:.0f} s")
    problems += problems_on_disk(faulty) + compare(ref, faulty, tolerance_db)
    return {"kills": kinds, "problems": problems, "uninterrupted_s": round(took, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("outputs/fault-test"))
    ap.add_argument("--tolerance-db", type=float, default=1.0)
    ap.add_argument("--edits", type=int, default=2, help="toy edits (x no-edit and sds)")
    a = ap.parse_args(argv)
    import shutil

    shutil.rmtree(a.work, ignore_errors=True)
    report = fault_run(a.work, a.kills, a.seed, a.tolerance_db, a.edits)
    print(json.dumps(report, indent=1))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
