"""`pip install .` (a wheel, not an editable install) must give a working piva.

The toy world's trained weights and the threestudio YAMLs are package data; an editable
install reads them from the checkout and so hides a missing package-data pattern. Here the
wheel is built from the checkout, its file list is compared with the files in the tree (walked
independently, so a new weight file that pyproject.toml does not package fails), and then it is
installed into a bare folder and used from a process that cannot see the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "piva" / "toyworld" / "weights"
TS_CONFIGS = REPO / "piva" / "threestudio" / "configs"
EXTENSION_DIR = "threestudio-piva"  # piva.threestudio.install.EXTENSION_DIR; not imported so nothing loads from the checkout


def _files(root: Path, suffix: str = "") -> Set[str]:
    """Files under `root` as wheel member names (paths relative to the repository, '/'-separated)."""
    found = set()
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found |= {(Path(folder) / n).relative_to(REPO).as_posix() for n in names if n.endswith(suffix)}
    return found


def _run(cmd: List[str], **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from the checkout, offline, with the environment's setuptools."""
    work = tmp_path_factory.mktemp("wheel")
    # setuptools' build/ and egg-info go to the temp folder: none lands in the shared checkout, and no
    # stale build/lib from an earlier build can put a file in the wheel that the patterns left out.
    extra = work / "setup.cfg"
    extra.write_text(f"[build]\nbuild_base = {work / 'build'}\n[egg_info]\negg_base = {work}\n")
    env = {**os.environ, "DIST_EXTRA_CONFIG": str(extra)}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(work / "dist"), str(REPO)], cwd=REPO, env=env)
    wheels = list((work / "dist").glob("piva-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a bare folder (what `pip install .` puts in site-packages)."""
    target = tmp_path_factory.mktemp("site")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)])
    return target.resolve()


def _outside_env(target: Path) -> Dict[str, str]:
    """Only the installed copy is importable: PYTHONPATH is the install folder, the cwd is not the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_wheel_holds_the_toy_weights_and_threestudio_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    weights = _files(WEIGHTS)
    assert "piva/toyworld/weights/prior/model_index.json" in weights  # the walk itself found the tree
    assert not weights - names, f"toy weights missing from the wheel: {sorted(weights - names)}"
    configs = _files(TS_CONFIGS, ".yaml")
    assert "piva/threestudio/configs/piva-noe.yaml" in configs
    assert not configs - names, f"threestudio configs missing from the wheel: {sorted(configs - names)}"
    assert "piva/threestudio/README.md" in names  # the installer links it into the extension


def test_wheel_holds_every_tracked_package_file(wheel):
    """Every committed file under piva/ (schemas, the architectures' configs, ...) ships, not only .py."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listed = _run(["git", "ls-files", "-z", "piva"], cwd=REPO).stdout.split("\0")
    tracked = {p for p in listed if p and (REPO / p).is_file()}
    assert tracked
    missing = tracked - set(zipfile.ZipFile(wheel).namelist())
    assert not missing, f"tracked package files missing from the wheel: {sorted(missing)}"


LOAD_FROM_INSTALL = r"""
import json
import torch
from safetensors.torch import load_file

import piva
from piva.toyworld import quality
from piva.toyworld.judge import WEIGHTS, create_judge

torch.set_num_threads(1)


def mismatches(module, path):
    # Names of saved tensors the loaded module lacks or holds differently: loading must use these very files.
    state, saved = module.state_dict(), load_file(str(path))
    bad = [k for k, v in saved.items() if k not in state or not torch.equal(state[k].to(v.dtype), v)]
    return {"saved": len(saved), "bad": bad[:5]}


prior = quality.load_toy_prior(device="cpu", controlnet=True)
judge, _, _ = create_judge()
print(json.dumps({
    "piva": piva.__file__,
    "dirs": [str(quality.PRIOR_DIR), str(quality.CONTROLNET_DIR), str(WEIGHTS)],
    "checks": {
        "unet": mismatches(prior.unet, quality.PRIOR_DIR / "unet" / "diffusion_pytorch_model.safetensors"),
        "vae": mismatches(prior.vae, quality.PRIOR_DIR / "vae" / "diffusion_pytorch_model.safetensors"),
        "text_encoder": mismatches(prior.text_encoder, quality.PRIOR_DIR / "text_encoder" / "model.safetensors"),
        "controlnet": mismatches(prior.controlnet, quality.CONTROLNET_DIR / "diffusion_pytorch_model.safetensors"),
        "judge": mismatches(judge, WEIGHTS / "judge" / "open_clip_model.safetensors"),
    },
}))
"""


def test_installed_wheel_loads_the_toy_prior_and_judge(installed, tmp_path):
    out = _run([sys.executable, "-c", LOAD_FROM_INSTALL], cwd=tmp_path, env=_outside_env(installed))
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(report["piva"]).resolve().is_relative_to(installed), report["piva"]
    for d in report["dirs"]:
        assert Path(d).resolve().is_relative_to(installed), d
    for name, check in report["checks"].items():
        assert check["saved"] > 0 and not check["bad"], (name, check)


def _fake_threestudio(root: Path) -> Path:
    """What the installer checks of a threestudio checkout (as in test_threestudio.py)."""
    (root / "threestudio").mkdir(parents=True)
    (root / "custom").mkdir()
    (root / "launch.py").write_text("def load_custom_modules():\n    pass\n")
    (root / "threestudio" / "__init__.py").write_text('__version__ = "0.2.3"\n')
    (root / "requirements.txt").write_text("diffusers<0.20\n")
    return root


def test_installed_wheel_links_its_threestudio_configs(installed, tmp_path):
    ts = _fake_threestudio(tmp_path / "threestudio")
    configs = installed / "piva" / "threestudio" / "configs"
    expected = {p.name: p.read_bytes() for p in TS_CONFIGS.glob("*.yaml")}
    dest = ts / "custom" / EXTENSION_DIR
    env = _outside_env(installed)
    for flags in ([], ["--copy"]):
        _run([sys.executable, "-m", "piva.threestudio.install", str(ts), *flags], cwd=tmp_path, env=env)
        assert str(installed / "piva") in (dest / "__init__.py").read_text()  # the installed copy ran
        assert (dest / "configs").is_symlink() == (not flags)
        if not flags:
            assert (dest / "configs").resolve() == configs
            assert (dest / "README.md").resolve() == installed / "piva" / "threestudio" / "README.md"
        assert {p.name: p.read_bytes() for p in (dest / "configs").glob("*.yaml")} == expected
