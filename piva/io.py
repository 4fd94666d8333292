"""Atomic writes: the one place that writes a file or folder so that a kill never leaves half of it.

Every layer uses it (adapters, checkpoints, images, results), so it imports nothing from piva.
A reader never sees a missing or half-written path: files replace in one rename; a folder is
swapped with the old one in one `renameat2(RENAME_EXCHANGE)` on Linux (elsewhere two renames,
the only gap left). Temporaries carry their host and pid, so the next writer of the same path
removes those left by processes that died.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

PathLike = Union[str, Path]

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _tag() -> str:
    return f"{_HOST}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_temporaries(folder: Path, path: Path) -> list[Path]:
    """Temporaries of `path` in `folder` left by dead processes on this host (another host's may be live)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)"
                         rf"\.(tmp{re.escape(path.suffix)}|old)$")
    stale = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return stale
    for p in entries:
        m = pattern.match(p.name)
        if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            stale.append(p)
    return stale


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextmanager
def atomic_path(path: PathLike, tmp_dir: Optional[PathLike] = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` (the same name with a host-pid tag, so writers pick the same
    format from the suffix); on success it replaces `path` in one step, a file or a whole folder; on an
    error it is removed and `path` keeps what it had. `tmp_dir` (same file system) keeps the temporary
    out of a folder that other tools list, e.g. nerfstudio's checkpoint folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tmp_dir or path.parent)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in _stale_temporaries(folder, path) + (
            _stale_temporaries(path.parent, path) if folder != path.parent else []):
        _remove(stale)
    tmp = folder / f".{path.name}.{_tag()}.tmp{path.suffix}"
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            # A folder cannot be renamed over a non-empty one: swap them, then remove the old one.
            if _exchange(tmp, path):
                _remove(tmp)
            else:
                old = path.with_name(f".{path.name}.{_tag()}.old")
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


_FINGERPRINTS: dict = {}


def file_fingerprint(path: PathLike) -> str:
    """SHA-1 of a file's bytes (first 16 hex digits): what a result or cache was made from. Kept per
    process by (path, size, mtime), so asking again for an unchanged checkpoint costs a stat."""
    import hashlib

    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FINGERPRINTS:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FINGERPRINTS[key] = h.hexdigest()[:16]
    return _FINGERPRINTS[key]


def settings_key(**settings: Any) -> str:
    """Short hash of what a cached step was built from (JSON of the settings), for folder names: a changed
    setting gets a folder of its own instead of reusing a stale one."""
    import hashlib

    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
