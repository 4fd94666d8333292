"""The `piva` command: 2D editing, the offline demo and small tools."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def cache_dir() -> Path:
    return Path(os.environ.get("PIVA_CACHE", Path.home() / ".cache" / "piva"))


def _edit_image(args: argparse.Namespace) -> None:
    from piva.guidance import GuidanceConfig
    from piva.image.edit import ImageEditConfig, edit_image
    from piva.prior import DiffusionPrior

    guidance = GuidanceConfig(
        mode=args.method,
        source_prompt=args.source,
        target_prompt=args.target,
        guidance_scale=args.guidance_scale,
        identity_weight=args.identity_weight,
        adapter_rank=args.adapter_rank,
        adapter_lr=args.adapter_lr,
        use_controlnet=False,
    )
    guidance.validate()  # fail on bad prompts before loading any weights
    if not Path(args.image).is_file():
        raise FileNotFoundError(f"image {args.image!r} does not exist")
    prior = DiffusionPrior.from_pretrained(args.model, device=args.device)
    record = edit_image(
        args.image,
        prior,
        guidance,
        args.out,
        ImageEditConfig(steps=args.steps, lr=args.lr, seed=args.seed, resolution=args.resolution),
    )
    state = "stopped early at" if record["interrupted"] else "finished"
    print(f"{state} step {record['steps_done']} in {record['seconds']:.1f}s -> {Path(args.out) / 'edited.png'}")


def _demo(args: argparse.Namespace) -> None:
    from piva.prior.tiny import build_tiny_prior

    model = cache_dir() / "tiny-random-sd"
    if not (model / "model_index.json").is_file():
        print(f"building a tiny random prior in {model} (offline; its weights are untrained)")
        build_tiny_prior(model, seed=0, with_controlnet=True, sample_size=32)
    args.model, args.image = str(model), str(EXAMPLES / "red-cube.png")
    args.source, args.target = "a red cube", "a blue cube"
    print(
        "demo: PiVa 2D edit of examples/red-cube.png with a tiny RANDOM prior - it shows the whole\n"
        "pipeline runs offline; the pixels mean nothing until trained weights are used."
    )
    _edit_image(args)


def _make_tiny_prior(args: argparse.Namespace) -> None:
    from piva.prior.tiny import build_tiny_prior

    path = build_tiny_prior(args.out, seed=args.seed, with_controlnet=True)
    print(f"wrote a tiny random prior to {path} (ControlNet in {path / 'controlnet'})")


def _add_edit_options(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--method", choices=["piva", "dds", "sds"], default="piva")
    p.add_argument("--steps", type=int, default=steps, help="optimisation steps (paper: 1000)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate on the latent (cosine schedule)")
    p.add_argument("--identity-weight", type=float, default=0.4, help="lambda of eq. 9 (PiVa only)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="CFG of the base model")
    p.add_argument("--adapter-rank", type=int, default=4)
    p.add_argument("--adapter-lr", type=float, default=1e-4)
    p.add_argument("--resolution", type=int, default=None, help="short side in pixels (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    from piva.prior import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="piva", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("edit-image", help="edit an image with a source and a target prompt")
    p.add_argument("--image", required=True)
    p.add_argument("--source", required=True, help="describes the input image")
    p.add_argument("--target", required=True, help="describes the wanted result")
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local diffusers folder")
    p.add_argument("--out", required=True, help="output folder")
    _add_edit_options(p, steps=1000)
    p.set_defaults(func=_edit_image)

    p = sub.add_parser("demo", help="offline demo on built-in data")
    p.add_argument("--out", default="outputs/demo")
    _add_edit_options(p, steps=60)
    p.set_defaults(func=_demo)

    p = sub.add_parser("make-tiny-prior", help="write a tiny random diffusers checkpoint (for tests)")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny_prior)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"piva: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
