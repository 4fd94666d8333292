"""threestudio on a machine without CUDA: pure-torch stand-ins, for tests, CI and CPU runs.

    cd /path/to/threestudio
    python -m piva.threestudio.cpu launch.py --config ... --train [key=value ...]

threestudio needs CUDA in five places, all replaced here in this process only (no file of
threestudio, nerfacc or tiny-cuda-nn is changed; a GPU run uses plain `python launch.py`):

* tiny-cuda-nn (`tinycudann`): its HashGrid encoding becomes nerfstudio's pure-torch
  `HashEncoding`, its fused MLPs a bias-free `nn.Sequential`, as tcnn's are;
* nerfacc's compiled ray marching (`traverse_grids`, `ray_aabb_intersect`) and packed scans
  (`exclusive_sum`, `exclusive_prod`, ...): torch versions, scans on padded per-ray rows;
* nvdiffrast, which threestudio imports at start-up for its mesh renderers: a module that
  says what is missing when it is used (the NeRF path never uses it);
* `threestudio.utils.misc.get_device()` returns cuda, and `torch.cuda.device(...)` wraps the
  tcnn modules: cpu, and a no-op context;
* launch.py's hard-coded `Trainer(accelerator="gpu")`: the CPU accelerator, one device.

Only what piva's configs use is covered: tcnn HashGrid + FullyFusedMLP/CutlassMLP, and nerfacc's
occupancy grid without cone tracing. Anything else fails with one line naming it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import runpy
import sys
import types
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

# --------------------------------------------------------------------------- tiny-cuda-nn


def _hash_grid_config(config: dict) -> dict:
    otype = config.get("otype")
    if otype == "Grid" and config.get("type", "Hash") == "Hash":  # ProgressiveBandHashGrid's spelling
        otype = "HashGrid"
    if otype != "HashGrid":
        raise NotImplementedError(f"piva's CPU stand-in for tiny-cuda-nn has no {otype!r} encoding (HashGrid only): run on a GPU")
    return config


class Encoding(nn.Module):
    """tcnn.Encoding(HashGrid) on CPU: nerfstudio's torch hash grid with tcnn's level sizes and init."""

    def __init__(self, n_input_dims: int, encoding_config: dict, seed: int = 1337, dtype: Optional[torch.dtype] = None):
        super().__init__()
        from nerfstudio.field_components.encodings import HashEncoding

        cfg = _hash_grid_config(dict(encoding_config))
        if n_input_dims != 3:
            raise NotImplementedError(f"piva's CPU stand-in for tiny-cuda-nn encodes 3-D points only, not {n_input_dims}-D")
        levels = int(cfg.get("n_levels", 16))
        base = float(cfg.get("base_resolution", 16))
        scale = float(cfg.get("per_level_scale", 2.0))
        self.encoding = HashEncoding(
            num_levels=levels, min_res=int(base), max_res=int(round(base * scale ** (levels - 1))),
            log2_hashmap_size=int(cfg.get("log2_hashmap_size", 19)), features_per_level=int(cfg.get("n_features_per_level", 2)),
            hash_init_scale=1e-4, implementation="torch",  # tcnn initialises its table uniformly in [-1e-4, 1e-4]
        )
        self.n_input_dims = n_input_dims
        self.n_output_dims = levels * int(cfg.get("n_features_per_level", 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.encoding(x.float())


_ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus,
                "tanh": nn.Tanh, "leakyrelu": nn.LeakyReLU, "exponential": None}


def _activation(name: Optional[str]) -> nn.Module:
    key = str(name or "None").lower()
    if key not in _ACTIVATIONS:
        raise NotImplementedError(f"piva's CPU stand-in for tiny-cuda-nn has no {name!r} activation")
    if key == "exponential":
        return _Exp()
    return _ACTIVATIONS[key]()


class _Exp(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(x)


class Network(nn.Module):
    """tcnn.Network(FullyFusedMLP / CutlassMLP) on CPU: the same layers, without biases as in tcnn."""

    def __init__(self, n_input_dims: int, n_output_dims: int, network_config: dict, seed: int = 1337):
        super().__init__()
        cfg = dict(network_config)
        if cfg.get("otype") not in ("FullyFusedMLP", "CutlassMLP", "MLP"):
            raise NotImplementedError(f"piva's CPU stand-in for tiny-cuda-nn has no {cfg.get('otype')!r} network")
        width, hidden = int(cfg.get("n_neurons", 64)), int(cfg.get("n_hidden_layers", 1))
        dims = [n_input_dims] + [width] * hidden + [n_output_dims]
        layers: list = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b, bias=False))
            layers.append(_activation(cfg.get("activation", "ReLU") if i < len(dims) - 2 else cfg.get("output_activation")))
        self.network = nn.Sequential(*layers)
        self.n_input_dims, self.n_output_dims = n_input_dims, n_output_dims

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x.float())


class NetworkWithInputEncoding(nn.Module):
    def __init__(self, n_input_dims: int, n_output_dims: int, encoding_config: dict, network_config: dict, seed: int = 1337):
        super().__init__()
        self.encoding = Encoding(n_input_dims, encoding_config)
        self.network = Network(self.encoding.n_output_dims, n_output_dims, network_config)
        self.n_input_dims, self.n_output_dims = n_input_dims, n_output_dims

    def forward(self, x: Tensor) -> Tensor:
        return self.network(self.encoding(x))


def tinycudann_module() -> types.ModuleType:
    """A `tinycudann` module made of the classes above."""
    mod = types.ModuleType("tinycudann", "piva's CPU stand-in for tiny-cuda-nn (piva.threestudio.cpu)")
    mod.Encoding, mod.Network, mod.NetworkWithInputEncoding = Encoding, Network, NetworkWithInputEncoding
    mod.free_temporary_memory = lambda: None
    return mod


# --------------------------------------------------------------------------- nvdiffrast


class _Missing(types.ModuleType):
    """A module that imports (its names even appear in annotations) and says what is missing when used."""

    why = "needs CUDA"

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        message = f"{self.__name__}.{name} {self.why}; piva's NeRF configs do not use it"

        def unavailable(*args, **kwargs):
            raise RuntimeError(message)

        return type(name, (), {"__new__": lambda cls, *a, **k: unavailable(), "__doc__": message})


def missing_modules(names: Sequence[str], why: str) -> dict:
    """Stand-in packages for `names` (dotted names included), each saying `why` when used."""
    modules: dict = {}
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            full = ".".join(parts[:i])
            if full not in modules:
                modules[full] = _Missing(full)
                modules[full].why = why
                modules[full].__path__ = []  # a package, so dotted imports resolve
            if i > 1:
                setattr(modules[".".join(parts[: i - 1])], parts[i - 1], modules[full])
    return modules


def unavailable_modules() -> dict:
    """nvdiffrast (CUDA-only, imported at start-up by threestudio's mesh code) and, when the checkout lacks its
    `extern/` folder, the zero123 code two guidances import at start-up."""
    import importlib.util

    modules = missing_modules(["nvdiffrast.torch"], "needs CUDA (nvdiffrast): threestudio's mesh renderers do not run on CPU")
    if importlib.util.find_spec("extern") is None:
        modules.update(missing_modules(["extern.ldm_zero123", "extern.zero123"],
                                       "is in threestudio's extern/ folder, which this checkout lacks"))
    return modules


# --------------------------------------------------------------------------- nerfacc


def _rows(starts: Tensor, counts: Tensor, values: Tensor, fill: float) -> Tuple[Tensor, Tensor, Tensor]:
    """The packed chunks as padded rows: [n_chunks, longest], the mask of real entries, their flat indices."""
    width = int(counts.max()) if counts.numel() else 0
    col = torch.arange(width, device=values.device)
    mask = col[None] < counts[:, None]
    index = (starts[:, None].long() + col[None])[mask]
    dense = values.new_full((counts.numel(), width), fill)
    dense[mask] = values[index]
    return dense, mask, index


def _unrows(dense: Tensor, mask: Tensor, index: Tensor, like: Tensor) -> Tensor:
    out = torch.zeros_like(like)
    out[index] = dense[mask]
    return out


def _inclusive_sum(starts, counts, inputs, normalize: bool, backward: bool) -> Tensor:
    dense, mask, index = _rows(starts, counts, inputs, 0.0)
    if backward:  # the gradient of a forward scan is the reversed scan
        dense = dense.flip(1)
    out = dense.cumsum(1)
    if backward:
        out = out.flip(1)
    if normalize:
        out = out / out[:, -1:].clamp_min(1e-10) if out.shape[1] else out
    return _unrows(out, mask, index, inputs)


def _exclusive_sum(starts, counts, inputs, normalize: bool, backward: bool) -> Tensor:
    if normalize:
        raise NotImplementedError("piva's CPU stand-in for nerfacc has no normalised exclusive sum")
    return _inclusive_sum(starts, counts, inputs, False, backward) - inputs


def _prod(starts, counts, inputs, exclusive: bool) -> Tensor:
    dense, mask, index = _rows(starts, counts, inputs, 1.0)
    out = dense.cumprod(1)
    if exclusive:
        out = torch.cat([torch.ones_like(out[:, :1]), out[:, :-1]], 1)
    return _unrows(out, mask, index, inputs)


def _prod_backward(starts, counts, inputs, grad_outputs, exclusive: bool) -> Tensor:
    with torch.enable_grad():
        x = inputs.detach().requires_grad_(True)
        y = _prod(starts, counts, x, exclusive)
        (grad,) = torch.autograd.grad(y, x, grad_outputs)
    return grad


def _ray_aabb_intersect(rays_o, rays_d, aabbs, near_plane=-math.inf, far_plane=math.inf, miss_value=math.inf):
    from nerfacc.grid import _ray_aabb_intersect as torch_version  # nerfacc's own pure-torch reference

    return torch_version(rays_o, rays_d, aabbs, near_plane, far_plane, miss_value)


@torch.no_grad()
def traverse_grids(rays_o: Tensor, rays_d: Tensor, binaries: Tensor, aabbs: Tensor, near_planes: Optional[Tensor] = None,
                   far_planes: Optional[Tensor] = None, step_size: float = 1e-3, cone_angle: float = 0.0):
    """nerfacc.traverse_grids in torch: fixed steps from where a ray enters the grids to where it leaves,
    keeping the steps whose midpoint lies in an occupied cell (of the finest level that holds it)."""
    from nerfacc.data_specs import RayIntervals, RaySamples

    if cone_angle != 0.0:
        raise NotImplementedError("piva's CPU stand-in for nerfacc marches with a constant step (cone_angle 0)")
    n = rays_o.shape[0]
    device = rays_o.device
    t_mins, t_maxs, hits = _ray_aabb_intersect(rays_o, rays_d, aabbs)
    near = torch.zeros(n, device=device) if near_planes is None else near_planes
    far = torch.full((n,), math.inf, device=device) if far_planes is None else far_planes
    enter = torch.maximum(near, torch.where(hits, t_mins, math.inf).amin(1))
    leave = torch.minimum(far, torch.where(hits, t_maxs, -math.inf).amax(1))
    hit = hits.any(1) & (leave > enter)
    steps = torch.where(hit, ((leave - enter) / step_size).ceil(), torch.zeros_like(enter)).long()
    k = torch.arange(int(steps.max()) if n else 0, device=device)
    keep = k[None] < steps[:, None]
    ray, step = keep.nonzero(as_tuple=True)
    t0 = enter[ray] + step * step_size
    t1 = torch.minimum(t0 + step_size, leave[ray])
    mid = (t0 + t1) / 2
    points = rays_o[ray] + rays_d[ray] * mid[:, None]
    occupied = torch.zeros_like(mid, dtype=torch.bool)
    unassigned = torch.ones_like(occupied)
    res = torch.tensor(binaries.shape[1:], device=device)
    for level in range(aabbs.shape[0]):
        lo, hi = aabbs[level, :3], aabbs[level, 3:]
        inside = unassigned & ((points >= lo) & (points < hi)).all(-1)
        ijk = ((points[inside] - lo) / (hi - lo) * res).long().clamp(torch.zeros_like(res), res - 1)
        occupied[inside] = binaries[level][ijk[:, 0], ijk[:, 1], ijk[:, 2]]
        unassigned &= ~inside
    ray, t0, t1, mid = ray[occupied], t0[occupied], t1[occupied], mid[occupied]
    counts = torch.bincount(ray, minlength=n)
    starts = counts.cumsum(0) - counts
    m = ray.numel()
    edges = torch.stack([t0, t1], 1).reshape(-1)
    left = torch.tensor([True, False], device=device).repeat(m)
    intervals = RayIntervals(vals=edges, packed_info=torch.stack([starts * 2, counts * 2], 1),
                             ray_indices=ray.repeat_interleave(2), is_left=left, is_right=~left)
    samples = RaySamples(vals=mid, packed_info=torch.stack([starts, counts], 1), ray_indices=ray)
    return intervals, samples


@torch.no_grad()
def pack_info(ray_indices: Tensor, n_rays: Optional[int] = None) -> Tensor:
    """nerfacc.pack_info on any device (nerfacc's refuses CPU tensors): [start, count] of each ray's samples."""
    if n_rays is None:
        n_rays = int(ray_indices.max()) + 1 if ray_indices.numel() else 0
    counts = torch.bincount(ray_indices.long(), minlength=n_rays).to(ray_indices.dtype)
    return torch.stack([counts.cumsum(0) - counts, counts], -1)


def patch_nerfacc(setattr=setattr) -> None:
    """Route nerfacc's compiled entry points to the torch versions above (`setattr`: e.g. pytest's monkeypatch)."""
    import nerfacc
    import nerfacc.cuda as compiled
    import nerfacc.estimators.occ_grid as occ_grid
    import nerfacc.grid as grid
    import nerfacc.pack as pack
    import nerfacc.volrend as volrend

    for name, fn in {
        "inclusive_sum": _inclusive_sum,
        "exclusive_sum": _exclusive_sum,
        "inclusive_prod_forward": lambda s, c, x: _prod(s, c, x, exclusive=False),
        "exclusive_prod_forward": lambda s, c, x: _prod(s, c, x, exclusive=True),
        "inclusive_prod_backward": lambda s, c, x, y, g: _prod_backward(s, c, x, g, exclusive=False),
        "exclusive_prod_backward": lambda s, c, x, y, g: _prod_backward(s, c, x, g, exclusive=True),
        "ray_aabb_intersect": _ray_aabb_intersect,
    }.items():
        setattr(compiled, name, fn)
    for module in (grid, occ_grid):
        setattr(module, "traverse_grids", traverse_grids)
    for module in (nerfacc, pack, volrend):
        setattr(module, "pack_info", pack_info)


# --------------------------------------------------------------------------- torch.cuda, Lightning, threestudio


class _NoDevice(contextlib.nullcontext):
    """torch.cuda.device(...) where there is no CUDA device: nothing to switch."""

    def __init__(self, device=None) -> None:
        super().__init__()


def patch_lightning() -> None:
    """launch.py asks for accelerator="gpu", devices=-1: the CPU accelerator with one device instead."""
    import pytorch_lightning as pl

    init = pl.Trainer.__init__
    if getattr(init, "_piva_cpu", False):
        return

    @functools.wraps(init)
    def cpu_init(self, *args, **kwargs):
        if kwargs.get("accelerator") in ("gpu", "cuda", "auto", None):
            kwargs.update(accelerator="cpu", devices=1)
        init(self, *args, **kwargs)

    cpu_init._piva_cpu = True  # type: ignore[attr-defined]
    pl.Trainer.__init__ = cpu_init


def _cpu_device():
    return torch.device("cpu")


def install() -> None:
    """Put every stand-in in place, then import threestudio (from the current folder) with them."""
    sys.modules.setdefault("tinycudann", tinycudann_module())
    for name, module in unavailable_modules().items():
        sys.modules.setdefault(name, module)
    if not torch.cuda.is_available():
        torch.cuda.device = _NoDevice  # type: ignore[assignment]
    patch_nerfacc()
    patch_lightning()
    import threestudio.utils.misc as misc

    # Modules bind get_device by name (`from ... import get_device`), so the function itself is changed.
    misc.get_device.__code__ = _cpu_device.__code__


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or not args[0].endswith(".py"):
        print("usage: python -m piva.threestudio.cpu launch.py --config CONFIG --train|--test [key=value ...]\n"
              "(from your threestudio checkout)", file=sys.stderr)
        return 2
    script = Path(args[0])
    if not script.is_file():
        print(f"piva: error: {script} not found: run from your threestudio checkout (the folder with launch.py)",
              file=sys.stderr)
        return 2
    root = str(script.resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    install()
    sys.argv = [str(script), *args[1:]]
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
