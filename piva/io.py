"""Atomic writes: the one place that writes a file or folder so that a kill never leaves half of it.

Every layer uses it (adapters, checkpoints, images, results), so it imports nothing from piva.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

PathLike = Union[str, Path]


@contextmanager
def atomic_path(path: PathLike, tmp_dir: Optional[PathLike] = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers pick the same format); on success
    it replaces `path` in one rename, a file or a whole folder; on an error it is removed and `path`
    keeps what it had. `tmp_dir` (same file system) keeps the temporary out of a folder that other
    tools list, e.g. nerfstudio's checkpoint folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp_dir or path.parent) / f".{path.stem}.{os.getpid()}.tmp{path.suffix}"
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            # A folder cannot be renamed over a non-empty one: move the old one aside first.
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def atomic_write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str))


def atomic_torch_save(obj: Any, path: PathLike, tmp_dir: Optional[PathLike] = None) -> Path:
    import torch

    with atomic_path(path, tmp_dir) as tmp:
        torch.save(obj, tmp)
    return Path(path)
