"""`piva doctor`: can this machine run a method, and is everything it needs here?

Answers in seconds without network: the device and its free memory, what the method's
diffusion side needs (the budget measured with `benchmark/real_size.py`, shipped as
`piva/prior/configs/budget.json`), whether the weights are in the local cache (and the
exact command to fetch them if not), and whether the 3D front ends import. Exit 1
when something the method needs is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Optional

from piva.prior.loading import DEFAULT_CONTROLNET, DEFAULT_MODEL

BUDGET = Path(__file__).parent / "prior" / "configs" / "budget.json"
# What each benchmark-facing method needs from the model hub (piva-dds/-sds need no ControlNet).
NEEDS_CONTROLNET = {"piva": True, "piva-object": True, "piva-small": True, "piva-dds": False, "piva-sds": False}


def device_report() -> dict:
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return {"device": torch.cuda.get_device_name(), "kind": "cuda", "free_gib": free / 2**30, "total_gib": total / 2**30}
    mem = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            mem[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return {"device": f"CPU ({os.cpu_count()} cores)", "kind": "cpu", "free_gib": mem.get("MemAvailable", 0) / 2**30,
            "total_gib": mem.get("MemTotal", 0) / 2**30}


def budget_row(method: str, dtype: Optional[str] = None) -> Optional[dict]:
    """The measured diffusion-side budget of `method` (at its own render size), or None if not measured."""
    rows = json.loads(BUDGET.read_text())["rows"]
    base = "piva" if method == "piva-object" else method  # same cost: only lambda differs
    own = [r for r in rows if r["method"] == base and (dtype is None or r["dtype"] == dtype)]
    return own[0] if own else None


def weights_report(model: str, controlnet: bool = False) -> tuple[bool, str]:
    """(found, where or the command to fetch it), from the local folder or cache only: never the network."""
    from piva.prior.loading import REQUIRED_PARTS, ModelNotFoundError, resolve_model_dir

    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # a cache look-up only; the doctor never waits on a hub
    try:
        path = resolve_model_dir(model, parts=() if controlnet else REQUIRED_PARTS)
    except ModelNotFoundError:
        return False, f"huggingface-cli download {model}"
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved
    if controlnet and not (path / "config.json").is_file():
        return False, f"{path} has no config.json: pass a diffusers ControlNet folder"
    return True, str(path)


def doctor(method: str = "piva", model: str = DEFAULT_MODEL, controlnet: str = DEFAULT_CONTROLNET) -> tuple[int, list[str]]:
    """(exit code, report lines)."""
    if method not in NEEDS_CONTROLNET:
        return 2, [f"piva doctor: error: unknown method {method!r}: choose one of {', '.join(NEEDS_CONTROLNET)}"]
    lines, problems = [], []
    dev = device_report()
    lines.append(f"device      {dev['device']}: {dev['free_gib']:.1f} of {dev['total_gib']:.1f} GiB free")
    row = budget_row(method, None if dev["kind"] == "cuda" else "float32")
    if row is None:
        lines.append(f"needs       {method}: no measured budget on this kind of device (benchmark/real_size.py measures it)")
    else:
        need = row["peak_gib"]
        lines.append(f"needs       {method}: {need:.1f} GiB for the diffusion side at {row['render']} px {row['dtype']} "
                     f"(+ the scene's render; measured on {json.loads(BUDGET.read_text())['device']}, "
                     f"{row['step_s']:.2f} s/step there)")
        if dev["kind"] == "cuda" and dev["free_gib"] < need:
            problems.append(f"{method} needs about {need:.1f} GiB; {dev['free_gib']:.1f} GiB are free "
                            "(try piva-small, or adapter_checkpointing and encoder_checkpointing: 4.2 GiB for piva)")
    if dev["kind"] != "cuda":
        lines.append("note        no GPU: real-size edits take minutes per step on a CPU; the toy world (piva demo) runs here")
    wanted = [("base model", model, False)] + ([("ControlNet", controlnet, True)] if NEEDS_CONTROLNET[method] else [])
    for what, name, is_controlnet in wanted:
        found, where = weights_report(name, is_controlnet)
        lines.append(f"{what:11s} {'found' if found else 'MISSING'}: {name}" + (f" ({where})" if found else ""))
        if not found:
            problems.append(f"{what} {name} is not cached: {where}")
    for front, module in (("nerfstudio", "nerfstudio"), ("threestudio", "threestudio")):
        ok = importlib.util.find_spec(module) is not None
        lines.append(f"{front:11s} {'importable' if ok else 'not installed'}")
    lines += [f"MISSING     {p}" for p in problems]
    lines.append("ok" if not problems else f"{len(problems)} problem(s): see MISSING above")
    return (1 if problems else 0), lines
