"""Atomic writes (piva.io) and the one image-grid writer (piva.data.images)."""

import json

import numpy as np
import pytest
import torch

from piva.data.images import image_grid, save_image_grid
from piva.io import atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text


class Boom(RuntimeError):
    pass


def leftovers(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_failing_file_writer_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            assert tmp != target and tmp.parent == target.parent and tmp.suffix == ".json"
            tmp.write_text('{"v": 2, "half')  # a half-written file, then the writer dies
            raise Boom
    assert json.loads(target.read_text()) == {"v": 1}
    assert leftovers(tmp_path, {"result.json"}) == []


def test_failing_writer_of_a_new_file_leaves_nothing(tmp_path):
    with pytest.raises(Boom):
        with atomic_path(tmp_path / "sub" / "new.txt") as tmp:
            tmp.write_text("partial")
            raise Boom
    assert leftovers(tmp_path / "sub", set()) == []


def test_writes_replace_the_file(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    atomic_torch_save({"x": torch.arange(3)}, tmp_path / "w.pt")
    assert torch.equal(torch.load(tmp_path / "w.pt")["x"], torch.arange(3))
    assert leftovers(tmp_path, {"a.txt", "w.pt"}) == []


def fill(folder, files):
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)


def test_folder_replacement_and_failure(tmp_path):
    target = tmp_path / "adapter"
    with atomic_path(target) as tmp:
        fill(tmp, {"a.bin": "1", "b.json": "{}"})
    assert sorted(p.name for p in target.iterdir()) == ["a.bin", "b.json"]
    # Replacing a non-empty folder: the new contents only, the old file b.json gone.
    with atomic_path(target) as tmp:
        fill(tmp, {"a.bin": "2"})
    assert sorted(p.name for p in target.iterdir()) == ["a.bin"] and (target / "a.bin").read_text() == "2"
    # A writer that dies half-way leaves the previous folder whole.
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            fill(tmp, {"a.bin": "3", "c.bin": "x"})
            raise Boom
    assert sorted(p.name for p in target.iterdir()) == ["a.bin"] and (target / "a.bin").read_text() == "2"
    assert leftovers(tmp_path, {"adapter"}) == []


def test_image_grid_layout_scale_and_rounding():
    a = torch.zeros(2, 3, 2, 3)  # row 0: two 2x3 images
    a[1, 0] = 1.0  # second image red
    b = [torch.full((3, 2, 3), 0.5), torch.full((1, 3, 2, 3), 2.0)]  # row 1: grey, then over-range (clamped)
    grid = image_grid([a, b], scale=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 2 * 2, 2 * 3 * 2, 3)
    # Independent expectation: build the 1x grid by hand, then repeat each pixel 2x2.
    expect = np.zeros((4, 6, 3), np.uint8)
    expect[0:2, 3:6, 0] = 255
    expect[2:4, 0:3] = 128  # round(0.5 * 255) = 128
    expect[2:4, 3:6] = 255
    assert np.array_equal(grid, np.kron(expect, np.ones((2, 2, 1), np.uint8)))


def test_save_image_grid_round_trips_and_is_atomic(tmp_path, monkeypatch):
    import imageio.v3 as iio

    rows = [torch.rand(3, 3, 4, 5), torch.rand(3, 3, 4, 5)]
    path = save_image_grid(tmp_path / "strip.png", rows, scale=3)
    assert np.array_equal(iio.imread(path), image_grid(rows, scale=3))

    def dies_half_way(uri, image, **kwargs):
        open(uri, "wb").write(b"\x89PNG half")
        raise Boom

    monkeypatch.setattr(iio, "imwrite", dies_half_way)
    with pytest.raises(Boom):
        save_image_grid(path, [torch.zeros(1, 3, 4, 5)])
    monkeypatch.undo()
    assert np.array_equal(iio.imread(path), image_grid(rows, scale=3))  # the old strip is kept
    assert leftovers(tmp_path, {"strip.png"}) == []


def test_folder_replacement_has_no_moment_without_the_folder(tmp_path):
    """A reader polling the folder while it is replaced 200 times never finds it missing or empty."""
    import threading

    target = tmp_path / "adapter"
    with atomic_path(target) as tmp:
        fill(tmp, {"a.bin": "0"})
    misses, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                if not (target / "a.bin").is_file():
                    misses.append(1)
            except OSError:
                misses.append(1)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(200):
            with atomic_path(target) as tmp:
                fill(tmp, {"a.bin": str(i)})
    finally:
        stop.set()
        t.join()
    assert misses == [] and (target / "a.bin").read_text() == "199"
    assert leftovers(tmp_path, {"adapter"}) == []


def test_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    from piva import io

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    live = os.getppid()  # a pid that does
    target = tmp_path / "step.ckpt"
    stale_file = tmp_path / f".step.ckpt.{io._HOST}-{dead.pid}.tmp.ckpt"
    stale_folder = tmp_path / f".step.ckpt.{io._HOST}-{dead.pid}.old"
    other_host = tmp_path / f".step.ckpt.elsewhere-{dead.pid}.tmp.ckpt"  # may be live on its own host
    live_file = tmp_path / f".step.ckpt.{io._HOST}-{live}.tmp.ckpt"
    stale_file.write_bytes(b"x" * 100)
    stale_folder.mkdir()
    (stale_folder / "f").write_text("x")
    other_host.write_text("x")
    live_file.write_text("x")
    atomic_torch_save({"x": 1}, target)
    assert leftovers(tmp_path, {"step.ckpt"}) == sorted([other_host.name, live_file.name])
