"""The real-size estimate (benchmark/real_size.py --device meta) against what the allocator really holds."""

import ctypes
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from piva.guidance import GuidanceConfig, ScoreDistillation
from piva.prior import DiffusionPrior

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmark"))
from real_size import LiveBytes, estimate_step, inputs, one_step  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc_in_use():
    """glibc's own count of bytes handed out (heap + mmapped): an account independent of torch's tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")

    def in_use() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    return in_use


class _AllocatorPeak(TorchDispatchMode):
    """The most bytes glibc holds above the start, read after every op."""

    def __init__(self, in_use) -> None:
        super().__init__()
        self.in_use, self.start, self.peak = in_use, in_use(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use() - self.start)
        return out


def test_meta_estimate_of_a_piva_step_matches_the_allocators_peak_on_cpu(tiny_dir, one_thread):
    """A PiVa step (score, its gradient to the pixels, the adapters' update) of the tiny prior at 128 px on the
    CPU: the peak that glibc saw, against the estimate from shapes alone on the meta device."""
    in_use = _libc_in_use()
    cfg = GuidanceConfig(source_prompt="a red cube", target_prompt="a blue cube", same_latent=False)
    sd = ScoreDistillation(DiffusionPrior.from_pretrained(tiny_dir, tiny_dir / "controlnet"), cfg)
    rgb, src, depth = inputs(128, torch.device("cpu"), seed=0)
    for i in range(2):  # warm-up: the adapters' optimizer state, thread pools and BLAS buffers exist after it
        one_step(sd, rgb, src, depth, i, lambda: None)
    measured = _AllocatorPeak(in_use)
    with measured:
        one_step(sd, rgb, src, depth, 2, lambda: None)
    counted = LiveBytes()
    with counted:
        one_step(sd, rgb, src, depth, 3, lambda: None)
    assert measured.peak > 20e6, measured.peak  # activations, not noise, dominate what is compared
    assert counted.peak == pytest.approx(measured.peak, rel=0.05)  # the tensor count on real tensors (0.2 % measured)
    resident, peak, flops, _ = estimate_step(sd, rgb, src, depth, with_ops=False)
    weights = sum(p.numel() * p.element_size() for m in sd.prior.modules() for p in m.parameters())
    assert resident >= weights and flops > 0
    assert peak - resident == pytest.approx(measured.peak, rel=0.05)  # from shapes alone (0.1 % measured)


def test_gpu_check_times_the_2d_edit_from_the_editors_own_record(tiny_dir, tmp_path, monkeypatch):
    """`benchmark/gpu_check.py` (2D part, CPU, tiny model): one row per method, timed from the steps after the
    warm-up in the editor's run.json (read here independently), next to the method's budget."""
    import json

    import gpu_check

    out = tmp_path / "check.json"
    monkeypatch.setattr(sys, "argv", [
        "gpu_check.py", "--model", str(tiny_dir), "--controlnet", str(tiny_dir / "controlnet"), "--methods", "piva-dds",
        "piva", "--size", "32", "--steps", "2", "--warmup", "1", "--skip-3d", "--device", "cpu",
        "--work", str(tmp_path / "work"), "--out", str(out)])
    gpu_check.main()
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"piva", "piva-dds"}
    for method, row in rows.items():
        history = json.loads((tmp_path / "work" / f"2d-{method}" / "run.json").read_text())["history"]
        assert len(history) == 3 and row["finite"] and row["render"] == 32 and row["dtype"] == "float32"
        assert row["step_s"] == pytest.approx((history[2]["elapsed_s"] - history[0]["elapsed_s"]) / 2, abs=1e-3)
        assert row["step_s"] > 0 and row["budget"]["peak_gib"] > 0
    assert json.loads((tmp_path / "work" / "2d-piva" / "run.json").read_text())["guidance"]["mode"] == "piva"
