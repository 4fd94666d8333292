"""Time per step and peak GPU memory of each registered method's diffusion work, at real size.

    python benchmark/real_size.py --out real_size.json                 # random weights, shipped SD-2.1 configs
    python benchmark/real_size.py --model stabilityai/stable-diffusion-2-1-base \\
        --controlnet thibaud/controlnet-sd21-depth-diffusers           # your downloaded weights

One step here is exactly the diffusion side of a `ns-train piva` step (piva.nerfstudio's
pipeline): the score on the edited view (VAE encoder with gradient, one batched
UNet + ControlNet call), its gradient back to the pixels, and the adapters' update.
The field's own render is left out (it depends on the scene, not the method). Each
method is taken from the registered nerfstudio configs (render size, dtype, score
settings); where nerfstudio is not installed, `--cases FILE` gives the same table,
written on a machine that has it with `--write-cases FILE`.
With random weights the numbers that come out of the model mean nothing; cost does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from piva.guidance import GuidanceConfig, ScoreDistillation

SOURCE, TARGET = "a round cake on a plate", "a square cake on a plate"
BASELINE = "piva-dds"


def registered_cases(names: list[str]) -> list[dict]:
    """The settings that decide a method's diffusion cost, read from the registered nerfstudio configs."""
    from piva.nerfstudio.piva_config import METHODS

    cases = []
    for name in names:
        p = METHODS[name].config.pipeline
        g = {f.name: getattr(p.guidance, f.name) for f in dataclasses.fields(GuidanceConfig)}
        cases.append(dict(method=name, guidance=g, render_short_side=p.render_short_side,
                          diffusion_dtype=p.diffusion_dtype, diffusion_model=p.diffusion_model,
                          controlnet_model=p.controlnet_model))
    return cases


def load_prior(case: dict, args: argparse.Namespace, device: torch.device, dtype: str):
    from piva.prior import DiffusionPrior
    from piva.prior.architectures import build_random_prior

    control = case["controlnet_model"] if case["guidance"]["mode"] == "piva" else None
    if args.model is None:
        return build_random_prior(case["diffusion_model"], control, device=device, dtype=dtype)
    control = (args.controlnet or control) if control else None
    return DiffusionPrior.from_pretrained(args.model, control, device=device, dtype=dtype)


def inputs(size: int, device: torch.device, seed: int, views: int = 1) -> tuple[torch.Tensor, ...]:
    """Smooth edited views, the original views and depth maps with background (what renders give)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(2 * views, 3, 8, 8, generator=g)
    both = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic").clamp(0, 1).to(device)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    depth = torch.where(xx**2 + yy**2 < 0.5, 3.0 + 0.5 * (xx**2 + yy**2), torch.zeros(()))
    return both[:views], both[views:], depth.expand(views, 1, size, size).to(device)


def one_step(sd: ScoreDistillation, rgb: torch.Tensor, src: torch.Tensor, depth: torch.Tensor, i: int,
             sync) -> dict:
    """One edit step's diffusion work, as PivaPipeline.get_train_loss_dict does it; returns its phase times."""
    g = torch.Generator().manual_seed(i)
    x = rgb.detach().requires_grad_(True)
    t0 = time.perf_counter()
    out = sd.step(x, depth=depth, source_rgb=src, step=i, generator=g)
    (grad,) = torch.autograd.grad(out.loss, x)
    sync()
    t1 = time.perf_counter()
    losses = sd.update_adapters(x.detach(), depth=depth, source_rgb=src, source_depth=depth, generator=g)
    sync()
    t2 = time.perf_counter()
    return {"score_s": t1 - t0, "adapters_s": t2 - t1, "finite": bool(torch.isfinite(grad).all()), **losses}


def measure(case: dict, args: argparse.Namespace, device: torch.device) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = args.dtype or case["diffusion_dtype"]  # None: the library's default for the device
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    prior = load_prior(case, args, device, dtype)
    g = dict(case["guidance"], source_prompt=SOURCE, target_prompt=TARGET)
    sd = ScoreDistillation(prior, GuidanceConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()}))
    build_s = time.perf_counter() - t_build
    size = args.size or case["render_short_side"]
    rgb, src, depth = inputs(size, device, args.seed, args.views)
    weights = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup):
        one_step(sd, rgb, src, depth, i, sync)
    phases = [one_step(sd, rgb, src, depth, args.warmup + i, sync) for i in range(args.steps)]
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    with FlopCounterMode(display=False) as counter:
        one_step(sd, rgb, src, depth, 10_000, sync)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            one_step(sd, rgb, src, depth, 20_000, sync)
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        args.profile.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "-" for c in case["method"])
        (args.profile / f"profile-{slug}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=30))
    mean = lambda k: sum(p[k] for p in phases) / len(phases)  # noqa: E731
    row = {
        "method": case["method"], "mode": case["guidance"]["mode"],
        "same_latent": GuidanceConfig(mode=case["guidance"]["mode"], same_latent=case["guidance"]["same_latent"]).uses_same_latent,
        "views": args.views, "render": size, "dtype": str(prior.dtype).replace("torch.", ""), "build_s": round(build_s, 2),
        "step_s": round(mean("score_s") + mean("adapters_s"), 4), "score_s": round(mean("score_s"), 4),
        "adapters_s": round(mean("adapters_s"), 4),
        "tflop_per_step": round(counter.get_total_flops() / 1e12, 3),
        "weights_gib": round(weights / 2**30, 2), "peak_gib": round(peak / 2**30, 2),
        "finite": all(p["finite"] for p in phases),
    }
    del sd, prior
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["piva", "piva-small", "piva-dds", "piva-sds"])
    p.add_argument("--variants", nargs="*", default=["piva-dds:same_latent=True"],
                   help="METHOD:FIELD=VALUE rows beside the registered ones (e.g. DDS on the shared z_t)")
    p.add_argument("--model", help="real weights (hub id or folder); default: random weights, shipped configs")
    p.add_argument("--controlnet", help="real depth ControlNet for --model")
    p.add_argument("--size", type=int, help="render short side for every method (default: the method's)")
    p.add_argument("--dtype", help="for every method (default: the method's; bf16 on GPU where it sets none)")
    p.add_argument("--views", type=int, default=1, help="views scored (and adapters trained) per step")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", type=Path, help="method table written by --write-cases (machines without nerfstudio)")
    p.add_argument("--write-cases", type=Path)
    p.add_argument("--out", type=Path, default=Path("real_size.json"))
    p.add_argument("--profile", type=Path, help="folder for a torch.profiler table of one step per method")
    a = p.parse_args()

    cases = json.loads(a.cases.read_text()) if a.cases else registered_cases(sorted(set(a.methods + [v.split(":")[0] for v in a.variants])))
    for v in a.variants:
        name, _, assign = v.partition(":")
        key, _, value = assign.partition("=")
        base = next(c for c in cases if c["method"] == name)
        try:
            value = json.loads(value.lower())
        except json.JSONDecodeError:
            pass  # a bare string
        cases.append(dict(base, method=v, guidance=dict(base["guidance"], **{key: value})))
    if a.write_cases:
        a.write_cases.write_text(json.dumps([c for c in cases if ":" not in c["method"]], indent=1))
        return
    cases = [c for c in cases if c["method"] in a.methods or c["method"] in a.variants]
    device = torch.device(a.device)
    rows = []
    for case in cases:
        rows.append(measure(case, a, device))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["method"] == BASELINE), None)
    for r in rows:
        r["x_dds_step"] = round(r["step_s"] / base["step_s"], 2) if base else None
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "weights": a.model or "random (shipped configs)", "rows": rows}
    a.out.write_text(json.dumps(info, indent=1))
    print(f"{'method':34s} {'render':>6s} {'dtype':>9s} {'s/step':>7s} {'x dds':>6s} {'TFLOP':>7s} {'peak GiB':>8s}")
    for r in rows:
        print(f"{r['method']:34s} {r['render']:6d} {r['dtype']:>9s} {r['step_s']:7.3f} {r['x_dds_step'] or 0:6.2f} "
              f"{r['tflop_per_step']:7.2f} {r['peak_gib']:8.2f}")


if __name__ == "__main__":
    main()
