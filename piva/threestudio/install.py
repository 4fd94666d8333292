"""Link piva's extension into a threestudio checkout and say which versions must change.

    python -m piva.threestudio.install /path/to/threestudio [--copy] [--force] [--strict]

It writes `<threestudio>/custom/threestudio-piva/`: an `__init__.py` that imports
`piva.threestudio.extension` (which registers the modules) and `configs/`, a symlink
to piva's `configs/threestudio` (a copy with --copy). The folder is not called
`piva`: launch.py imports each custom folder as a module named after the folder,
so `custom/piva` would replace the real `piva` package in `sys.modules`.

Then it compares threestudio's requirements.txt (and the packages installed in this
Python) with what piva needs and prints what to change. It never imports threestudio.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

EXTENSION_DIR = "threestudio-piva"
MARKER = "written by `python -m piva.threestudio.install`"
# What piva's peft adapters need (pyproject.toml); read from piva's metadata when it is installed.
PIVA_NEEDS = {"torch": ">=2.1", "diffusers": ">=0.32", "transformers": ">=4.40", "peft": ">=0.13"}
CHECKED = tuple(PIVA_NEEDS)

INIT_TEMPLATE = '''"""piva's threestudio extension ({marker}; piva at {root}).

threestudio's launch.py imports this folder at start-up; importing piva.threestudio.extension
registers piva-guidance, piva-edit-system, piva-reconstruction-system and piva-blender-datamodule.
"""

try:
    import piva.threestudio.extension  # noqa: F401
except ModuleNotFoundError as exc:
    if (exc.name or "").split(".")[0] != "piva":
        raise
    raise ImportError("threestudio-piva needs piva in this Python: pip install -e {root}") from None
'''


class InstallError(RuntimeError):
    """A problem the user must fix before the extension can be installed."""


def piva_root() -> Path:
    """The piva source checkout (the configs live beside the package, not inside it)."""
    import piva

    root = Path(piva.__file__).resolve().parent.parent
    if not (root / "configs" / "threestudio").is_dir():
        raise InstallError(
            f"piva's configs/threestudio is not next to the installed package ({root}): "
            "install piva from its source checkout with `pip install -e /path/to/piva`"
        )
    return root


def piva_needs() -> Dict[str, str]:
    """Version ranges piva declares for the packages threestudio also pins."""
    needs = dict(PIVA_NEEDS)
    try:
        for line in metadata.requires("piva") or []:
            req = Requirement(line)
            if req.name in needs and req.marker is None and str(req.specifier):
                needs[req.name] = str(req.specifier)
    except metadata.PackageNotFoundError:
        pass
    return needs


def check_checkout(root: Path) -> List[str]:
    """Fail unless `root` looks like threestudio; return warnings about it."""
    if not root.is_dir():
        raise InstallError(f"{root} is not a folder: pass the path of a threestudio checkout")
    missing = [p for p in ("launch.py", "threestudio/__init__.py") if not (root / p).is_file()]
    if missing:
        raise InstallError(f"{root} does not look like a threestudio checkout (no {', '.join(missing)})")
    if "load_custom_modules" not in (root / "launch.py").read_text(errors="replace"):
        raise InstallError(
            f"{root}/launch.py predates threestudio's custom extensions (no load_custom_modules): "
            "update threestudio (v0.2.3 or later)"
        )
    warnings = []
    shadow = root / "custom" / "piva"
    if shadow.exists() or shadow.is_symlink():
        warnings.append(
            f"{shadow} exists: launch.py would import it as the module `piva` and hide the real piva package; remove it"
        )
    return warnings


def threestudio_version(root: Path) -> Optional[str]:
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", (root / "threestudio" / "__init__.py").read_text(errors="replace"))
    return m.group(1) if m else None


def read_pins(requirements: Path, names: Sequence[str] = CHECKED) -> Dict[str, str]:
    """Specifiers that a requirements.txt gives the packages in `names` ('' when listed without a version)."""
    pins: Dict[str, str] = {}
    if not requirements.is_file():
        return pins
    for raw in requirements.read_text(errors="replace").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith(("-", "git+", "http:", "https:")):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        name = req.name.lower().replace("_", "-")
        if name in names:
            pins[name] = str(req.specifier)
    return pins


def compatible(pin: str, need: str) -> bool:
    """Whether some version satisfies both ranges (tries every bound either side names, and its neighbours)."""
    a, b = SpecifierSet(pin), SpecifierSet(need)
    if not str(a) or not str(b):
        return True
    candidates = set()
    for spec in list(a) + list(b):
        try:
            v = Version(spec.version.replace(".*", ""))
        except Exception:
            continue
        major, minor, micro = (list(v.release) + [0, 0])[:3]
        candidates |= {v, Version(f"{major}.{minor}.{micro + 1}"), Version(f"{major}.{minor + 1}"), Version(f"{major + 1}.0")}
    return any(a.contains(v, prereleases=True) and b.contains(v, prereleases=True) for v in candidates)


def installed(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class VersionReport:
    lines: List[str]
    conflicts: int


def version_report(root: Path) -> VersionReport:
    """What threestudio pins and this Python has, against what piva needs, and what to change."""
    needs = piva_needs()
    pins = read_pins(root / "requirements.txt")
    lines = [f"{'package':<13} {'threestudio pins':<18} {'installed here':<15} piva needs"]
    pin_fixes, env_fixes = [], []
    for name in CHECKED:
        pin, have, need = pins.get(name), installed(name), needs[name]
        pin_ok = pin is None or compatible(pin, need)
        have_ok = have is not None and SpecifierSet(need).contains(Version(have), prereleases=True)
        lines.append(
            f"{name:<13} {(pin if pin else 'unpinned') if pin is not None else '-':<18} {have or 'missing':<15} {need}"
            + ("" if pin_ok and have_ok else "   <- change")
        )
        if not pin_ok:
            pin_fixes.append((f"{name}{pin}", f"{name}{need}"))
        if not have_ok:
            env_fixes.append(f'"{name}{need}"')
    lines.append(f"(installed = this Python, {sys.executable})")
    if env_fixes:
        lines += ["", "In the Python that runs threestudio's launch.py:", f"    pip install {' '.join(env_fixes)}"]
        if any(f.startswith('"torch') for f in env_fixes):
            lines.append(
                "    then rebuild tiny-cuda-nn and nerfacc against the new torch (pip install --force-reinstall --no-cache-dir "
                "their git+ lines from threestudio's requirements.txt)"
            )
    if pin_fixes:
        lines += ["", f"In {root / 'requirements.txt'} (or `pip install -r` will downgrade them again):"]
        lines += [f"    {old:<24} ->  {new}" for old, new in pin_fixes]
    if pin_fixes or env_fixes:
        lines += [
            "",
            "With these versions threestudio's own LoRA guidances (stable-diffusion-vsd-guidance used by prolificdreamer,",
            "stable-diffusion-unified-guidance, zero123-unified-guidance) stop working: they build diffusers' old",
            "LoRAAttnProcessor, which diffusers removed in 0.30 (only an empty stub remains). piva's adapters use peft",
            "instead. Keep a separate threestudio environment for those methods.",
        ]
    return VersionReport(lines, len(pin_fixes) + len(env_fixes))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def link_extension(root: Path, copy: bool = False, force: bool = False) -> Path:
    """Create `<root>/custom/threestudio-piva`; replaces an earlier install, refuses anything else without force."""
    source = piva_root()
    dest = root / "custom" / EXTENSION_DIR
    if dest.exists() or dest.is_symlink():
        init = dest / "__init__.py"
        ours = init.is_file() and MARKER in init.read_text(errors="replace")
        if not ours and not force:
            raise InstallError(f"{dest} exists and was not written by this installer: move it away or pass --force")
        _remove(dest)
    dest.mkdir(parents=True)
    (dest / "__init__.py").write_text(INIT_TEMPLATE.format(marker=MARKER, root=source))
    links = {"configs": source / "configs" / "threestudio", "README.md": source / "piva" / "threestudio" / "README.md"}
    for name, target in links.items():
        if not target.exists():
            continue
        if copy:
            (shutil.copytree if target.is_dir() else shutil.copy2)(target, dest / name)
        else:
            (dest / name).symlink_to(target, target_is_directory=target.is_dir())
    return dest


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m piva.threestudio.install",
        description="Link piva's threestudio extension into a threestudio checkout and check package versions.",
    )
    parser.add_argument("threestudio", type=Path, help="path of the threestudio checkout (the folder with launch.py)")
    parser.add_argument("--copy", action="store_true", help="copy the configs instead of symlinking them")
    parser.add_argument(
        "--force", action="store_true", help="replace an existing custom/threestudio-piva not made by this installer"
    )
    parser.add_argument("--check", action="store_true", help="only check the checkout and the versions; install nothing")
    parser.add_argument("--strict", action="store_true", help="exit with status 3 when versions must change")
    args = parser.parse_args(argv)
    root = args.threestudio.expanduser().resolve()
    try:
        warnings = check_checkout(root)
        dest = None if args.check else link_extension(root, copy=args.copy, force=args.force)
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    version = threestudio_version(root)
    print(f"threestudio {version or '(unknown version)'} at {root}")
    for w in warnings:
        print(f"warning: {w}")
    if dest is not None:
        print(f"installed {dest} ({'copied' if args.copy else 'linked'} configs -> {dest / 'configs'})")
    report = version_report(root)
    print()
    print("\n".join(report.lines))
    print()
    if report.conflicts:
        print(f"{report.conflicts} version change(s) needed before running launch.py with custom/{EXTENSION_DIR}/configs/.")
    else:
        print(f"versions fit. From {root}: python launch.py --config custom/{EXTENSION_DIR}/configs/piva-noe.yaml --train ...")
    return 3 if (args.strict and report.conflicts) else 0


if __name__ == "__main__":
    sys.exit(main())
