"""Failures stop early and keep what was done; kills lose nothing (scripts/fault_test.py)."""

import importlib.util
import json
import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def _fault_script():
    spec = importlib.util.spec_from_file_location("fault_test", ROOT / "scripts" / "fault_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_an_unexpected_error_in_a_worker_is_the_edits_own(tmp_path):
    """A worker whose edit raises (a corrupt mesh: not a missing-data NotAvailable) records that edit's error with
    its last line; the other edit is stored and the leaderboard is written, with the failure listed."""
    from piva.noe.prepare import PrepareOptions
    from piva.noe.runner import RunOptions, result_path, run_benchmark

    broken = tmp_path / "broken.ply"
    broken.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 3\nend_header\nnot numbers\n")
    edits = [{"id": "cube-keep", "object": "cube", "type": "texturing", "source_prompt": "a red cube",
              "target_prompt": "a blue cube"},
             {"id": "broken-keep", "object": "broken", "type": "texturing", "source_prompt": "a thing",
              "target_prompt": "a blue thing"}]
    manifest = {"name": "faults", "objects": [{"id": "cube", "source": "toyworld", "source_prompt": "a red cube"},
                                              {"id": "broken", "source": "local", "path": str(broken),
                                               "source_prompt": "a thing"}], "edits": edits}
    out = tmp_path / "out"
    opts = RunOptions(out=out, methods=("no-edit",), preset="toy", eval_views=5,
                      prepare=PrepareOptions(root=out, preset="toy", source_steps=20))
    summary = run_benchmark(manifest, edits, opts, workers=2)
    assert list(summary["failed"]) == ["no-edit/broken-keep"]
    why = summary["failed"]["no-edit/broken-keep"]
    assert "Error" in why and "\n" not in why and len(why) < 700, why
    assert result_path(out, "no-edit", "cube-keep").is_file()
    md = (out / "leaderboard.md").read_text()
    assert "| no-edit | 1 |" in md and "| no-edit/broken-keep |" in md
    assert json.loads((out / "failed.json").read_text())["no-edit/broken-keep"]["why"] == why


@pytest.mark.slow
def test_kills_at_random_moments_lose_nothing(tmp_path):
    """SIGKILL of the driver alone or of the driver and its workers, or Ctrl-C of the driver, at random moments of a
    short toy run with 2 workers: no process outlives the kill, no file is corrupt, no edit is lost or counted
    twice, and the final leaderboard has the uninterrupted run's rows (scripts/fault_test.py runs more kills)."""
    # The Ctrl-C kills need runs that Ctrl-C can stop, as a user's run in a terminal: pytest started from a background
    # job of a non-interactive shell (`pytest ... &` in a script) has SIGINT ignored, and every run it starts would
    # inherit that and ignore the interrupt.
    sigint = signal.getsignal(signal.SIGINT)
    if sigint == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # A 20-step source fit (what is checked does not depend on its quality): the whole run, and with it every
        # kill moment, drawn as a fraction of the uninterrupted run's time, is ~30 % shorter than at 60 steps.
        report = _fault_script().fault_run(tmp_path, kills=3, seed=int(os.environ.get("PIVA_FAULT_SEED", "0")),
                                           edits=1, source_steps=20, log=print)
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert report["problems"] == [], report


def test_a_stale_temporary_of_a_dead_worker_is_not_a_result(tmp_path):
    """The fault checks read what a reader would: temporaries (dot names) are never results."""
    script = _fault_script()
    good = tmp_path / "results" / "piva" / "e.json"
    good.parent.mkdir(parents=True)
    good.write_text(json.dumps({"metrics": {}, "provenance": {}}))
    (good.parent / ".e.json.host-1.tmp.json").write_text('{"half')
    assert script.problems_on_disk(tmp_path) == []
    good.write_text('{"metrics": ')
    assert len(script.problems_on_disk(tmp_path)) == 1
