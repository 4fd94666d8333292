"""The `piva` command: 2D editing, the offline demo and small tools."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

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
    model = args.model
    if model == "toy":  # the toy world's trained prior, shipped with piva
        from piva.toyworld.quality import PRIOR_DIR

        model = str(PRIOR_DIR)
    prior = DiffusionPrior.from_pretrained(model, device=args.device)
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
    from piva.toyworld.demo import run_demo

    result = run_demo(Path(args.out), source=args.source, target=args.target, method=args.method,
                      source_steps=args.source_steps, edit_steps=args.steps, seed=args.seed, geometry=args.geometry,
                      same_latent=args.same_latent)
    m = result["metrics"]
    print(
        f"{result['method']}: judge success {m['judge_success_rate']:.0%}, target colour {m['target_colour_fraction']:.0%}, "
        f"PSNR vs original {m['psnr_vs_original']:.1f} dB, background PSNR {m['background_psnr_vs_original']:.1f} dB "
        f"({result['timings']['total_s'] / 60:.1f} min) -> {args.out}"
    )


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
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local diffusers folder, or 'toy' (the offline toy-world prior)")
    p.add_argument("--out", required=True, help="output folder")
    _add_edit_options(p, steps=1000)
    p.set_defaults(func=_edit_image)

    p = sub.add_parser("demo", help="toy world, offline: reconstruct a scene with nerfacto, edit it, judge it")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--source", default="a red cube", help="a toy-world caption, e.g. 'a green sphere'")
    p.add_argument("--target", default="a blue cube", help="a toy-world caption, e.g. 'a red cube on a white plate'")
    p.add_argument("--method", choices=["piva", "dds"], default="piva")
    p.add_argument("--steps", type=int, default=300, help="edit steps")
    p.add_argument("--source-steps", type=int, default=600, help="nerfacto steps for the source scene")
    p.add_argument("--geometry", choices=["auto", "keep", "edit"], default="auto",
                   help="keep: only colours change; edit: the whole field; auto: keep for colour-only edits")
    p.add_argument("--same-latent", action="store_true",
                   help="the paper's shared noisy latent for DDS (in the toy world it overshoots the target colour)")
    p.add_argument("--seed", type=int, default=0)
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
