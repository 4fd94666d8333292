"""Link piva's extension into a threestudio checkout and say which versions must change.

    python -m piva.threestudio.install /path/to/threestudio [--copy] [--force] [--check] [--strict]

It writes `<threestudio>/custom/threestudio-piva/`: an `__init__.py` that imports
`piva.threestudio.extension` (which registers the modules) and `configs/`, a symlink
to the installed package's `piva/threestudio/configs` (a copy with --copy). The folder is not called
`piva`: launch.py imports each custom folder as a module named after the folder,
so `custom/piva` would replace the real `piva` package in `sys.modules`.

Then it compares threestudio's requirements.txt (and the packages installed in this
Python) with what piva needs and prints what to change. Versions are read and compared
with `packaging` and `importlib.metadata`, as pip does. It never imports threestudio.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

EXTENSION_DIR = "threestudio-piva"
# Package data (pyproject.toml), so a wheel install has them as well as an editable one.
PACKAGE_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = PACKAGE_DIR / "configs"
MARKER = "written by `python -m piva.threestudio.install`"
# What piva's peft adapters need (pyproject.toml); read from piva's metadata when it is installed.
PIVA_NEEDS = {"torch": ">=2.1", "diffusers": ">=0.32", "transformers": ">=4.40", "peft": ">=0.13"}

INIT_TEMPLATE = '''"""piva's threestudio extension ({marker}; piva at {root}).

threestudio's launch.py imports this folder at start-up; importing piva.threestudio.extension
registers piva-guidance, piva-edit-system, piva-reconstruction-system and piva-blender-datamodule.
"""

try:
    import piva.threestudio.extension  # noqa: F401
except ModuleNotFoundError as exc:
    if (exc.name or "").split(".")[0] != "piva":
        raise
    raise ImportError("threestudio-piva needs piva in this Python: {how}") from None
'''

LORA_NOTE = """
With these versions threestudio's own LoRA guidances (stable-diffusion-vsd-guidance used by prolificdreamer,
stable-diffusion-unified-guidance, zero123-unified-guidance) stop working: they build diffusers' old
LoRAAttnProcessor, which diffusers removed in 0.30 (only an empty stub remains). piva's adapters use peft
instead. Keep a separate threestudio environment for those methods."""


class InstallError(RuntimeError):
    """A problem the user must fix before the extension can be installed."""


def configs_dir() -> Path:
    """The YAMLs shipped inside the package; found from this file, so any install (wheel or editable) works."""
    if not any(CONFIGS_DIR.glob("*.yaml")):
        raise InstallError(
            f"piva's threestudio configs are missing from the installed package ({CONFIGS_DIR}): "
            "reinstall piva (`pip install /path/to/piva`)"
        )
    return CONFIGS_DIR


def install_hint() -> str:
    """How to get piva back into a Python: `pip install -e` of the checkout this package lives in, if it is one."""
    checkout = PACKAGE_DIR.parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "piva" / "__init__.py").is_file():
        return f"pip install -e {checkout}"
    return "pip install /path/to/piva (or its wheel), the version that ran piva.threestudio.install"


def piva_needs() -> Dict[str, str]:
    """Version ranges piva declares for the packages threestudio also pins."""
    try:
        declared = [Requirement(line) for line in metadata.requires("piva") or []]
    except metadata.PackageNotFoundError:
        declared = []
    found = {canonicalize_name(r.name): str(r.specifier) for r in declared if r.marker is None and r.specifier}
    return {name: found.get(name, need) for name, need in PIVA_NEEDS.items()}


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
    shadow = root / "custom" / "piva"
    if shadow.exists() or shadow.is_symlink():
        return [f"{shadow} exists: launch.py would import it as the module `piva` and hide the real piva package; remove it"]
    return []


def threestudio_version(root: Path) -> Optional[str]:
    text = (root / "threestudio" / "__init__.py").read_text(errors="replace")
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    return m.group(1) if m else None


def read_pins(requirements: Path, names: Sequence[str] = tuple(PIVA_NEEDS)) -> Dict[str, str]:
    """Specifiers that a requirements.txt gives the packages in `names` ('' when listed without a version)."""
    pins: Dict[str, str] = {}
    lines = requirements.read_text(errors="replace").splitlines() if requirements.is_file() else []
    for line in lines:
        try:  # options (-r, -e), URLs and git+ lines are not requirements of a named version
            req = Requirement(line.split("#", 1)[0].strip())
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) in names:
            pins[canonicalize_name(req.name)] = str(req.specifier)
    return pins


def compatible(pin: str, need: str) -> bool:
    """Whether some release satisfies both ranges: every version either names, and the next one at each level."""
    both = SpecifierSet(pin) & SpecifierSet(need)
    named = []
    for spec in both:
        try:
            named.append(Version(spec.version.rstrip(".*")))
        except InvalidVersion:
            continue
    candidates = {v for n in named for v in (n, *(_next_release(n, level) for level in range(3)))}
    return not named or next(iter(both.filter(candidates, prereleases=True)), None) is not None


def _next_release(v: Version, level: int) -> Version:
    """0.32 -> 1.0.0 (level 0), 0.33.0 (level 1), 0.32.1 (level 2)."""
    release = (list(v.release) + [0, 0])[:3]
    return Version(".".join(str(x) for x in release[:level] + [release[level] + 1] + [0] * (2 - level)))


def version_report(root: Path) -> Tuple[List[str], int]:
    """What threestudio pins and this Python has, against what piva needs; the lines and the number of changes."""
    pins = read_pins(root / "requirements.txt")
    lines = [f"{'package':<13} {'threestudio pins':<18} {'installed here':<15} piva needs"]
    pin_fixes, env_fixes = [], []
    for name, need in piva_needs().items():
        pin = pins.get(name)
        try:
            have: Optional[str] = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        pin_ok = pin is None or compatible(pin, need)
        have_ok = have is not None and SpecifierSet(need).contains(have, prereleases=True)
        shown = "-" if pin is None else pin or "unpinned"
        lines.append(f"{name:<13} {shown:<18} {have or 'missing':<15} {need}" + ("" if pin_ok and have_ok else "   <- change"))
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
        lines += LORA_NOTE.splitlines()
    return lines, len(pin_fixes) + len(env_fixes)


def link_extension(root: Path, copy: bool = False, force: bool = False) -> Path:
    """Create `<root>/custom/threestudio-piva`; replaces an earlier install, refuses anything else without force."""
    configs = configs_dir()
    dest = root / "custom" / EXTENSION_DIR
    if dest.exists() or dest.is_symlink():
        init = dest / "__init__.py"
        if not force and not (init.is_file() and MARKER in init.read_text(errors="replace")):
            raise InstallError(f"{dest} exists and was not written by this installer: move it away or pass --force")
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        else:
            dest.unlink()
    dest.mkdir(parents=True)
    (dest / "__init__.py").write_text(INIT_TEMPLATE.format(marker=MARKER, root=PACKAGE_DIR.parent, how=install_hint()))
    links = {"configs": configs, "README.md": PACKAGE_DIR / "README.md"}
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
    print(f"threestudio {threestudio_version(root) or '(unknown version)'} at {root}")
    for w in warnings:
        print(f"warning: {w}")
    if dest is not None:
        print(f"installed {dest} ({'copied' if args.copy else 'linked'} configs -> {dest / 'configs'})")
    lines, conflicts = version_report(root)
    print("\n" + "\n".join(lines) + "\n")
    if conflicts:
        print(f"{conflicts} version change(s) needed before running launch.py with custom/{EXTENSION_DIR}/configs/.")
    else:
        print(f"versions fit. From {root}: python launch.py --config custom/{EXTENSION_DIR}/configs/piva-noe.yaml --train ...")
    return 3 if (args.strict and conflicts) else 0


if __name__ == "__main__":
    sys.exit(main())
