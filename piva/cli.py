"""The `piva` command: 2D editing, the offline demo and small tools."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Literal, Optional, Sequence, get_args, get_origin, get_type_hints

# -- options made from the config dataclasses: each knob is declared once, with its help -------------
def _docs(cls: type) -> dict[str, str]:
    import docstring_parser

    return {p.arg_name: " ".join((p.description or "").split()) for p in docstring_parser.parse_from_object(cls).params}


def _bool(text: str) -> Optional[bool]:
    value = {"true": True, "false": False, "auto": None}.get(text.lower(), "?")
    if value == "?":
        raise argparse.ArgumentTypeError(f"{text!r}: use true, false or auto")
    return value


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One `--field-name` option per field of `cls`, typed, with the field's default and docstring."""
    hints, docs = get_type_hints(cls), _docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, kw, default = hints[f.name], {}, f.default
        args = [a for a in get_args(tp) if a is not type(None)]
        if get_origin(tp) is Literal:
            kw = dict(choices=list(get_args(tp)))
        elif get_origin(tp) is tuple:
            kw = dict(type=args[0], nargs=len(args), metavar=tuple(f.name.upper() for _ in args))
        elif tp is bool or args == [bool]:
            kw = dict(type=_bool, metavar="{true,false" + (",auto}" if args else "}"))
        else:
            kw = dict(type=args[0] if args else tp)
        shown = "auto" if default is None and args == [bool] else default
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default,
                            help=f"{docs.get(f.name, '')} (default: {shown})".replace("%", "%%"), **kw)


def dataclass_values(args: argparse.Namespace, cls: type, skip: Sequence[str] = ()) -> dict:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in skip and hasattr(args, f.name)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


# The 2D editor's own settings of the score (paper section 5): LoRA on the UNet only.
_IMAGE_GUIDANCE_SKIP = ("mode", "source_prompt", "target_prompt", "use_controlnet")


def _edit_image(args: argparse.Namespace) -> None:
    from piva.guidance import GuidanceConfig
    from piva.image.edit import ImageEditConfig, edit_image, load_image
    from piva.prior import DiffusionPrior

    guidance = GuidanceConfig(mode=args.method, source_prompt=args.source, target_prompt=args.target,
                              use_controlnet=False, **dataclass_values(args, GuidanceConfig, _IMAGE_GUIDANCE_SKIP))
    guidance.validate()  # bad prompts and unreadable images fail before any weights are loaded
    load_image(args.image, short_side=8, multiple=1)
    model = args.model
    if model == "toy":  # the toy world's trained prior, shipped with piva
        from piva.toyworld.quality import PRIOR_DIR

        model = str(PRIOR_DIR)
    prior = DiffusionPrior.from_pretrained(model, device=args.device)
    record = edit_image(args.image, prior, guidance, args.out, ImageEditConfig(**dataclass_values(args, ImageEditConfig)))
    state = "stopped early at" if record["interrupted"] else "finished"
    print(f"{state} step {record['steps_done']} in {record['seconds']:.1f}s -> {Path(args.out) / 'edited.png'}")


def _demo(args: argparse.Namespace) -> None:
    from piva.demo import run_demo

    result = run_demo(Path(args.out), source=args.source, target=args.target, method=args.method,
                      source_steps=args.source_steps, edit_steps=args.steps, seed=args.seed, geometry=args.geometry,
                      representation=args.representation)
    m = result["metrics"]
    print(
        f"{result['registered_method']}: judge success {m['judge_success_rate']:.0%}, target colour {m['target_colour_fraction']:.0%}, "
        f"PSNR vs original {m['psnr_vs_original']:.1f} dB, background PSNR {m['background_psnr_vs_original']:.1f} dB "
        f"({result['timings']['total_s'] / 60:.1f} min) -> {args.out}"
    )


def _make_tiny_prior(args: argparse.Namespace) -> None:
    from piva.prior.tiny import build_tiny_prior

    path = build_tiny_prior(args.out, seed=args.seed, with_controlnet=True)
    print(f"wrote a tiny random prior to {path} (ControlNet in {path / 'controlnet'})")


def _doctor(args: argparse.Namespace) -> int:
    from piva.doctor import doctor
    from piva.prior.loading import DEFAULT_CONTROLNET

    code, lines = doctor(args.method, args.model, args.controlnet or DEFAULT_CONTROLNET)
    print("\n".join(lines), file=sys.stderr if code == 2 else sys.stdout)
    return code


def build_parser() -> argparse.ArgumentParser:
    from piva.guidance import MODES, GuidanceConfig
    from piva.image.edit import ImageEditConfig
    from piva.prior import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="piva", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("edit-image", help="edit an image with a source and a target prompt")
    p.add_argument("--image", required=True)
    p.add_argument("--source", required=True, help="describes the input image")
    p.add_argument("--target", required=True, help="describes the wanted result")
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local diffusers folder, or 'toy' (the offline toy-world prior)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", choices=list(MODES), default="piva", help="the score (default: piva)")
    add_dataclass_options(p, GuidanceConfig, skip=_IMAGE_GUIDANCE_SKIP)
    add_dataclass_options(p, ImageEditConfig)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=_edit_image)

    p = sub.add_parser("demo", help="toy world, offline: reconstruct a scene with nerfacto, edit it, judge it")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--source", default="a red cube", help="a toy-world caption, e.g. 'a green sphere'")
    p.add_argument("--target", default="a blue cube", help="a toy-world caption, e.g. 'a red cube on a white plate'")
    p.add_argument("--method", choices=["piva", "dds"], default="piva",
                   help="piva runs the registered piva-object method, dds piva-dds (toy sizes, toy prior)")
    p.add_argument("--steps", type=int, default=300, help="edit steps")
    p.add_argument("--source-steps", type=int, default=600, help="nerfacto steps for the source scene")
    p.add_argument("--geometry", choices=["auto", "keep", "edit"], default="auto",
                   help="keep: only colours change; edit: the whole field; auto: the method's rule "
                        "(kept when the prompts differ only in colour words)")
    p.add_argument("--representation", choices=["nerf", "splat"], default="nerf",
                   help="nerf: nerfacto + piva-object/piva-dds; splat: splatfacto + piva-splat/piva-splat-dds "
                        "(on CPU through piva's own rasteriser)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)

    p = sub.add_parser("doctor", help="can this machine run a method: device, memory, cached weights (offline, seconds)")
    p.add_argument("--method", default="piva", help="piva, piva-object, piva-small, piva-dds or piva-sds")
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model: hub id or local folder")
    p.add_argument("--controlnet", default=None, help="depth ControlNet: hub id or local folder (default: the method's)")
    p.set_defaults(func=_doctor)

    p = sub.add_parser("make-tiny-prior", help="write a tiny random diffusers checkpoint (for tests)")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny_prior)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (FileNotFoundError, ValueError) as exc:
        print(f"piva: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
