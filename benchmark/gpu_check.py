"""One command on a GPU machine: time per step and peak GPU memory of the registered methods on a real 2D edit
and a short 3D edit, next to the budget that `piva doctor` quotes (piva/prior/configs/budget.json).

    python benchmark/gpu_check.py --out gpu_check.json             # weights from the Hugging Face cache
    python benchmark/gpu_check.py --model /data/sd21 --controlnet /data/cn-depth
    python benchmark/gpu_check.py --random-weights                 # no weights: shipped configs, random init

2D: `piva edit-image`'s editor on `--image` (default: a smooth synthetic picture) at the method's render size,
"a round cake on a plate" -> "a square cake on a plate". 3D: the toy world's red cube written as a Blender
dataset at `--scene-size` px, reconstructed with nerfacto once, then each method's registered `ns-train` edit for
`--edit-steps` steps, timed by nerfstudio's own per-iteration average at the last step (set-up left out). Peak memory is `torch.cuda.max_memory_allocated` over each run; the 3D figure includes the
field's render, which the budget leaves out. With --random-weights the pictures mean nothing; cost does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_size import inputs, registered_cases  # noqa: E402

from piva.doctor import budget_row  # noqa: E402
from piva.guidance import GuidanceConfig  # noqa: E402
from piva.prior import DEFAULT_CONTROLNET, DEFAULT_MODEL, DiffusionPrior  # noqa: E402

SOURCE, TARGET = "a round cake on a plate", "a square cake on a plate"
METHODS = ["piva", "piva-small", "piva-dds"]


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def load_prior(args: argparse.Namespace, case: dict, device: torch.device, controlnet: bool) -> DiffusionPrior:
    from piva.prior.architectures import build_random_prior

    dtype = case["diffusion_dtype"]
    cn = (args.controlnet or case["controlnet_model"]) if controlnet else None
    if args.random_weights:
        return build_random_prior(case["diffusion_model"], case["controlnet_model"] if controlnet else None,
                                  device=device, dtype=dtype)
    return DiffusionPrior.from_pretrained(args.model or case["diffusion_model"], cn, device=device, dtype=dtype)


def check_2d(args: argparse.Namespace, case: dict, device: torch.device, out: Path) -> dict:
    """A 2D edit of `--warmup` + `--steps` steps, timed from the editor's own per-step record (run.json)."""
    from piva.image.edit import ImageEditConfig, edit_image

    size = case["render_short_side"]
    reset_peak(device)
    prior = load_prior(args, case, device, controlnet=False)
    guidance = GuidanceConfig(**{**case["guidance"], "source_prompt": SOURCE, "target_prompt": TARGET,
                                 "t_range": tuple(case["guidance"]["t_range"]),
                                 "annealed_range": tuple(case["guidance"]["annealed_range"])})
    image = args.image if args.image else inputs(size, torch.device("cpu"), 0)[0][:1]  # real_size's smooth view
    steps = args.warmup + args.steps
    record = edit_image(image, prior, guidance, out / f"2d-{case['method']}", ImageEditConfig(steps=steps, resolution=size),
                        progress=False)
    done = [h["elapsed_s"] for h in record["history"]]
    if len(done) < steps:
        raise SystemExit(f"gpu_check: error: the 2D edit stopped after {len(done)} of {steps} steps")
    step_s = (done[-1] - done[args.warmup - 1]) / args.steps  # the first steps (kernel set-up) left out
    dtype = str(prior.dtype).replace("torch.", "")
    del prior
    return {"method": case["method"], "part": "2d", "render": size, "dtype": dtype,
            "steps": args.steps, "step_s": round(step_s, 4), "peak_gib": peak_gib(device),
            "finite": all(torch.isfinite(torch.tensor(h.get("grad_norm", 0.0))) for h in record["history"]),
            "output": str(out / f"2d-{case['method']}" / "edited.png")}


def random_weights_folder(case: dict, root: Path) -> tuple[str, str]:
    """The shipped architectures with random weights written as diffusers folders (for `ns-train`, which loads
    by name)."""
    from piva.prior.architectures import build_random_prior

    model_dir, cn_dir = root / "random-sd", root / "random-controlnet"
    if not (model_dir / "model_index.json").is_file():
        prior = build_random_prior(case["diffusion_model"], case["controlnet_model"], device="cpu")
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            getattr(prior, part).save_pretrained(model_dir / part)
        prior.controlnet.save_pretrained(cn_dir)
        (model_dir / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return str(model_dir), str(cn_dir)


def check_3d(args: argparse.Namespace, case: dict, device: torch.device, out: Path) -> dict:
    """A short `ns-train` edit of the toy red cube; the second leg (a resume) times the steps."""
    from piva.nerfstudio import runs
    from piva.noe.prepare import toy_object_scene
    from piva.toyworld.scenes import Scene, write_blender_dataset

    data = out / "scene" / "data"
    if not (data / "transforms_train.json").is_file():
        write_blender_dataset(Scene.from_caption("a red cube"), data, n_train=40, n_val=4, size=args.scene_size, seed=0)
    scene = toy_object_scene(data)
    size = runs.RunSize(edit_steps=args.edit_steps, anneal_step=None, render_short_side=case["render_short_side"],
                        source_steps=args.source_steps, device=device.type, cpu_field=device.type == "cpu")
    source_run = runs.reconstruct(scene, out / "scene", size)
    model, controlnet = (args.model, args.controlnet) if not args.random_weights else random_weights_folder(case, out)
    cfg = runs.edit_config(case["method"], scene, source_run / "nerfstudio_models", out / "3d", "a red cube",
                           "a blue cube", size, diffusion_model=model or case["diffusion_model"],
                           controlnet_model=controlnet or case["controlnet_model"])
    cfg.experiment_name = case["method"]
    reset_peak(device)
    t0 = time.perf_counter()
    run = runs.edit(cfg)
    wall = time.perf_counter() - t0
    return {"method": case["method"], "part": "3d", "render": case["render_short_side"], "scene_px": args.scene_size,
            "steps": args.edit_steps, "step_s": round(last_iteration_time(run), 4), "wall_s": round(wall, 1),
            "peak_gib": peak_gib(device)}


def last_iteration_time(run: Path) -> float:
    """nerfstudio's own "Train Iter (time)" at the last step it logged: its average over the steps before, the
    first steps' set-up left behind."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run.glob("events.out.tfevents.*"))
    if not events:
        raise SystemExit(f"gpu_check: error: {run} has no event file: nerfstudio logged nothing")
    acc = EventAccumulator(str(events[-1]))
    acc.Reload()
    return acc.Scalars("Train Iter (time)")[-1].value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--model", help=f"base model (hub id or folder; default: the method's, {DEFAULT_MODEL})")
    p.add_argument("--controlnet", help=f"depth ControlNet (default: the method's, {DEFAULT_CONTROLNET})")
    p.add_argument("--random-weights", action="store_true", help="the shipped configs with random weights")
    p.add_argument("--image", type=Path, help="picture for the 2D edit (default: a synthetic one)")
    p.add_argument("--steps", type=int, default=20, help="timed 2D steps")
    p.add_argument("--warmup", type=int, default=3, help="first 2D steps left out of the time (at least 1)")
    p.add_argument("--edit-steps", type=int, default=30, help="3D edit steps")
    p.add_argument("--source-steps", type=int, default=2000, help="nerfacto steps for the toy scene")
    p.add_argument("--scene-size", type=int, default=256, help="pixels of the toy scene's captured views")
    p.add_argument("--skip-3d", action="store_true", help="2D only (no nerfstudio needed)")
    p.add_argument("--size", type=int, help="render short side for every method (default: the method's)")
    p.add_argument("--cases", type=Path, help="method table from `real_size.py --write-cases` (no nerfstudio here)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work", type=Path, help="folder for the runs (default: a temporary one)")
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    a = p.parse_args()
    if a.warmup < 1 or a.steps < 1:
        p.error("--warmup and --steps must be >= 1")

    cases = json.loads(a.cases.read_text()) if a.cases else registered_cases(a.methods)
    cases = [dict(c, render_short_side=a.size or c["render_short_side"]) for c in cases if c["method"] in a.methods]
    device = torch.device(a.device)
    if device.type != "cuda":
        print("gpu_check: no GPU here: the figures will be a CPU's (use benchmark/real_size.py --device meta for "
              "a GPU estimate)", file=sys.stderr)
    work = a.work or Path(tempfile.mkdtemp(prefix="piva-gpu-check-"))
    rows = []
    for case in cases:
        parts = [check_2d] + ([] if a.skip_3d else [check_3d])
        for check in parts:
            row = check(a, case, device, work)
            budget = budget_row(case["method"], row.get("dtype") if row["part"] == "2d" else None)
            if budget is not None:
                row["budget"] = {"step_s": budget["step_s"], "peak_gib": budget["peak_gib"], "render": budget["render"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "weights": "random (shipped configs)" if a.random_weights else (a.model or "the methods' own"),
            "budget_measured_on": json.loads((Path(__file__).resolve().parents[1] / "piva/prior/configs/budget.json").read_text())["device"],
            "rows": rows}
    a.out.write_text(json.dumps(info, indent=1))
    print(f"{'method':12s} {'part':4s} {'render':>6s} {'s/step':>8s} {'budget s':>8s} {'peak GiB':>8s} {'budget':>7s}")
    for r in rows:
        b = r.get("budget", {})
        step = r["step_s"]
        print(f"{r['method']:12s} {r['part']:4s} {r['render']:6d} {step:8.3f} {b.get('step_s', float('nan')):8.3f} "
              f"{r['peak_gib'] or float('nan'):8.2f} {b.get('peak_gib', float('nan')):7.2f}")
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
