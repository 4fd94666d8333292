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

Without a GPU, `--device meta` estimates the same table from shapes alone, in about a minute
a method on a CPU: FLOPs exactly (the same counter), peak memory as weights plus the most
bytes of tensor storage alive at once (`LiveBytes`), with attention as the GPU runs it (flash:
no attention matrix kept for backward). Checked against the H200 measurements in
docs/performance.md, and on CPU against the allocator's own count (tests/test_real_size.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

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


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once while the block runs, on any device, meta included.

    Every storage an op returns is counted until its last reference goes (a weak reference to the
    storage, checked after each op). On the meta device a value read back (`.item()`, `bool()`)
    has no data: `all(...)` reads True and `any(...)` False, so input checks pass as on good
    input, and other scalars read 0.5 (one at a time or several with `.tolist()`)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0
        self._answers: dict[int, bool] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            if args[0].dtype == torch.bool:
                return self._answers.get(id(args[0]), True)
            return 0.5 if args[0].dtype.is_floating_point else 1
        if func is torch.ops.aten._to_copy.default and args[0].is_meta and kwargs.get("device") == torch.device("cpu"):
            x = args[0]  # several values read back at once (`.tolist()`): as `.item()` reads them
            return torch.full(x.shape, 0.5 if x.dtype.is_floating_point else 1, dtype=kwargs.get("dtype") or x.dtype)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_meta and func.overloadpacket in (torch.ops.aten.all, torch.ops.aten.any):
            self._answers[id(out)] = func.overloadpacket is torch.ops.aten.all
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                known = self.live.get(storage._cdata)
                if known is None or known[0].expired():  # new, or a freed storage's address used again
                    self.now += storage.nbytes() - (known[1] if known else 0)
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        if self.now > self.peak:  # `now` still counts freed storages: only a possible new peak needs the exact sum
            for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                self.now -= self.live.pop(key)[1]
            self.peak = max(self.peak, self.now)
        return out


class OpCount(TorchDispatchMode):
    """aten operators dispatched while the block runs (views and in-place ops included): on a GPU each
    non-view op is a kernel launch or more, so their number is what a launch-bound step pays for.
    Enter it inside `LiveBytes` on the meta device (which answers the values read back)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        return func(*args, **(kwargs or {}))


def count_ops(sd: ScoreDistillation, rgb: torch.Tensor, src: torch.Tensor, depth: torch.Tensor, i: int = 0) -> dict:
    """aten ops of one step's phases, as `one_step` runs them: the score with its backward to the pixels,
    and the adapters' update (optimizer step included)."""
    g = torch.Generator().manual_seed(i)
    x = rgb.detach().requires_grad_(True)
    with OpCount() as score:
        out = sd.step(x, depth=depth, source_rgb=src, step=i, generator=g)
        torch.autograd.grad(out.loss, x)
        del out
    with OpCount() as update:
        sd.update_adapters(x.detach(), depth=depth, source_rgb=src, source_depth=depth, generator=g)
    return {"score_ops": score.total, "adapter_ops": update.total, "ops": score.total + update.total}


@contextlib.contextmanager
def flash_attention_on_meta():
    """Attention on meta tensors as a GPU runs it (flash: output and log-sum-exp kept, no L x L matrix);
    the meta device's own choice, the math path, would keep every attention matrix for backward."""
    sdpa = F.scaled_dot_product_attention

    def flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if q.is_meta and attn_mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


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
    del out  # as the pipeline does: the score's graph goes before the update
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
    if device.type == "meta":
        return estimate(case, args, dtype or "bfloat16")
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
    t_warm = time.perf_counter()
    for i in range(args.warmup):
        one_step(sd, rgb, src, depth, i, sync)
    warmup_s = time.perf_counter() - t_warm
    phases = [one_step(sd, rgb, src, depth, args.warmup + i, sync) for i in range(args.steps)]
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    with FlopCounterMode(display=False) as counter:
        one_step(sd, rgb, src, depth, 10_000, sync)
    ops = count_ops(sd, rgb, src, depth, 10_001)
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
        "views": args.views, "render": size, "dtype": str(prior.dtype).replace("torch.", ""), "build_s": round(build_s, 2), "warmup_s": round(warmup_s, 1),
        "step_s": round(mean("score_s") + mean("adapters_s"), 4), "score_s": round(mean("score_s"), 4),
        "adapters_s": round(mean("adapters_s"), 4),
        "tflop_per_step": round(counter.get_total_flops() / 1e12, 3),
        "weights_gib": round(weights / 2**30, 2), "peak_gib": round(peak / 2**30, 2),
        "finite": all(p["finite"] for p in phases), **ops,
    }
    del sd, prior
    return row


def resident_bytes(sd: ScoreDistillation) -> int:
    """Weights of every model plus the adapters' optimizer state: what stays allocated between steps."""
    total = sum(p.numel() * p.element_size() for m in sd.prior.modules() for p in m.parameters())
    if sd.adapters is not None:
        total += sum(v.numel() * v.element_size() for state in sd.adapters.optimizer.state.values()
                     for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total


def estimate(case: dict, args: argparse.Namespace, dtype: str) -> dict:
    """`measure`'s row from shapes alone (the meta device): FLOPs counted, peak memory estimated."""
    if args.model is not None:
        raise SystemExit("real_size: error: --device meta estimates from the shipped configs; leave --model out")
    prior = load_prior(case, args, torch.device("meta"), dtype)
    g = dict(case["guidance"], source_prompt=SOURCE, target_prompt=TARGET)
    sd = ScoreDistillation(prior, GuidanceConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()}))
    size = args.size or case["render_short_side"]
    resident, peak, flops, ops = estimate_step(sd, *inputs(size, torch.device("cpu"), args.seed, args.views))
    return {
        "method": case["method"], "mode": case["guidance"]["mode"],
        "same_latent": GuidanceConfig(mode=case["guidance"]["mode"], same_latent=case["guidance"]["same_latent"]).uses_same_latent,
        "views": args.views, "render": size, "dtype": str(prior.dtype).replace("torch.", ""), "estimated": True,
        "step_s": None, "tflop_per_step": round(flops / 1e12, 3),
        "weights_gib": round(resident / 2**30, 2), "peak_gib": round(peak / 2**30, 2), **ops,
    }


def estimate_step(sd: ScoreDistillation, rgb: torch.Tensor, src: torch.Tensor, depth: torch.Tensor,
                  with_ops: bool = True) -> tuple[int, int, int, dict]:
    """(resident bytes, peak bytes, FLOPs, aten ops) of one step, with everything moved to the meta device first."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = torch.device("meta")
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # the adapters' optimizer keeps its parameters
    try:
        sd.prior.to(meta)  # peft leaves new LoRA weights on the CPU beside a meta base layer: all of it moves
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    if sd.adapters is not None:  # state from steps already taken moves with its parameters
        for state in sd.adapters.optimizer.state.values():
            state.update({k: v.to(meta) for k, v in state.items() if isinstance(v, torch.Tensor)})
        # The fused AdamW a GPU runs: its kernel has a meta form, only its first step's device check refuses
        # meta, so the state that step would make is made here.
        for group in sd.adapters.optimizer.param_groups:
            group.update(fused=True, foreach=None)
            for p in group["params"]:
                state = sd.adapters.optimizer.state[p]
                if not state:
                    state.update(step=torch.zeros((), device=meta), exp_avg=torch.zeros_like(p),
                                 exp_avg_sq=torch.zeros_like(p))
    sd.uncond_text, sd.source_text, sd.target_text = (x.to(meta) for x in (sd.uncond_text, sd.source_text, sd.target_text))
    rgb, src, depth = (x.to(meta) for x in (rgb, src, depth))
    with flash_attention_on_meta():
        with LiveBytes():
            one_step(sd, rgb, src, depth, 0, lambda: None)  # warm-up: the adapters' optimizer state exists after it
        resident = resident_bytes(sd)
        live, counter = LiveBytes(), FlopCounterMode(display=False)
        with live:  # alone: the FLOP counter's module tracking keeps a checkpointed block's recomputed tensors alive
            one_step(sd, rgb, src, depth, 1, lambda: None)
        with counter, LiveBytes():  # LiveBytes answers the input checks' `.item()` on meta
            one_step(sd, rgb, src, depth, 2, lambda: None)
        ops = {}
        if with_ops:  # alone: the FLOP counter's module hooks dispatch operators of their own
            with LiveBytes():
                ops = count_ops(sd, rgb, src, depth, 3)
    return resident, resident + live.peak, counter.get_total_flops(), ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["piva", "piva-small", "piva-dds", "piva-sds"])
    p.add_argument("--variants", nargs="*", default=["piva-dds:same_latent=True", "piva:adapter_routing=peft"],
                   help="METHOD:FIELD=VALUE[,FIELD=VALUE] rows beside the registered ones (e.g. DDS on the shared z_t)")
    p.add_argument("--model", help="real weights (hub id or folder); default: random weights, shipped configs")
    p.add_argument("--controlnet", help="real depth ControlNet for --model")
    p.add_argument("--size", type=int, help="render short side for every method (default: the method's)")
    p.add_argument("--dtype", help="for every method (default: the method's; bf16 on GPU where it sets none)")
    p.add_argument("--views", type=int, default=1, help="views scored (and adapters trained) per step")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda: measure; meta: estimate FLOPs and peak memory from shapes, no GPU needed")
    p.add_argument("--cases", type=Path, help="method table written by --write-cases (machines without nerfstudio)")
    p.add_argument("--write-cases", type=Path)
    p.add_argument("--out", type=Path, default=Path("real_size.json"))
    p.add_argument("--profile", type=Path, help="folder for a torch.profiler table of one step per method")
    a = p.parse_args()

    cases = json.loads(a.cases.read_text()) if a.cases else registered_cases(sorted(set(a.methods + [v.split(":")[0] for v in a.variants])))
    for v in a.variants:
        name, _, assigns = v.partition(":")
        base = next(c for c in cases if c["method"] == name)
        changes = {}
        for assign in assigns.split(","):
            key, _, value = assign.partition("=")
            try:
                changes[key] = json.loads(value.lower())
            except json.JSONDecodeError:
                changes[key] = value  # a bare string
        cases.append(dict(base, method=v, guidance=dict(base["guidance"], **changes)))
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
        r["x_dds_step"] = round(r["step_s"] / base["step_s"], 2) if base and r["step_s"] else None
        r["x_dds_flop"] = round(r["tflop_per_step"] / base["tflop_per_step"], 2) if base else None
        r["x_dds_ops"] = round(r["ops"] / base["ops"], 2) if base else None
    info = {"device": {"cuda": lambda: torch.cuda.get_device_name(), "meta": lambda: "meta (estimate from shapes)"}.get(
                device.type, lambda: platform.processor() or "cpu")(),
            "torch": torch.__version__, "weights": a.model or "random (shipped configs)", "rows": rows}
    a.out.write_text(json.dumps(info, indent=1))
    print(f"{'method':34s} {'render':>6s} {'dtype':>9s} {'s/step':>7s} {'x dds':>6s} {'TFLOP':>7s} {'x dds':>6s} "
          f"{'aten ops (score + update)':>26s} {'x dds':>6s} {'peak GiB':>8s}")
    for r in rows:
        step = f"{r['step_s']:7.3f}" if r["step_s"] else f"{'-':>7s}"
        ops = f"{r['score_ops']:,} + {r['adapter_ops']:,}"
        print(f"{r['method']:34s} {r['render']:6d} {r['dtype']:>9s} {step} {r['x_dds_step'] or 0:6.2f} "
              f"{r['tflop_per_step']:7.2f} {r['x_dds_flop'] or 0:6.2f} {ops:>26s} {r['x_dds_ops'] or 0:6.2f} "
              f"{r['peak_gib']:8.2f}")


if __name__ == "__main__":
    main()
