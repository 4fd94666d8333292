"""Validate a Noe-style manifest: the JSON schema, then the rules a schema cannot state.

    .venv/bin/python benchmark/noe/validate.py [benchmark/noe/manifest.json] [--full-benchmark]
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Union

HERE = Path(__file__).resolve().parent
SCHEMA = HERE / "manifest.schema.json"
NERF_SYNTHETIC = ("chair", "drums", "ficus", "hotdog", "lego", "materials", "mic", "ship")
TYPES = ("texturing", "addition", "translation")


class ManifestError(ValueError):
    pass


def validate(manifest: Union[dict, str, Path], full_benchmark: bool = False) -> dict:
    """Return the manifest if valid; raise ManifestError listing every problem otherwise."""
    import jsonschema

    if not isinstance(manifest, dict):
        manifest = json.loads(Path(manifest).read_text())
    schema = json.loads(SCHEMA.read_text())
    problems = [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(jsonschema.Draft202012Validator(schema).iter_errors(manifest), key=lambda e: list(e.path))
    ]
    objects = {o.get("id"): o for o in manifest.get("objects", []) if isinstance(o, dict)}
    for kind, items in (("object", manifest.get("objects", [])), ("edit", manifest.get("edits", []))):
        dup = [k for k, n in Counter(i.get("id") for i in items if isinstance(i, dict)).items() if n > 1]
        problems += [f"duplicate {kind} id {d!r}" for d in dup]
    by_object: dict = {}
    for e in manifest.get("edits", []):
        if not isinstance(e, dict):
            continue
        o = objects.get(e.get("object"))
        if o is None:
            problems.append(f"edit {e.get('id')!r} names unknown object {e.get('object')!r}")
            continue
        if e.get("source_prompt") != o.get("source_prompt"):
            problems.append(f"edit {e.get('id')!r}: source_prompt differs from its object's")
        if e.get("source_prompt") == e.get("target_prompt"):
            problems.append(f"edit {e.get('id')!r}: target_prompt equals source_prompt")
        by_object.setdefault(o["id"], set()).add(e.get("type"))
        if o.get("source") == "toyworld":
            problems += _toy_caption_problems(e)
    for oid in objects:
        missing = [t for t in TYPES if t not in by_object.get(oid, set())]
        if missing:
            problems.append(f"object {oid!r} has no {', '.join(missing)} edit")
    if full_benchmark:
        n_obj, n_edit = len(objects), len(manifest.get("edits", []))
        if (n_obj, n_edit) != (35, 112):
            problems.append(f"Noe has 35 objects and 112 edits, this manifest {n_obj} and {n_edit}")
        scenes = {o.get("scene") for o in objects.values() if o.get("source") == "nerf-synthetic"}
        if scenes != set(NERF_SYNTHETIC):
            problems.append(f"NeRF-synthetic scenes {sorted(scenes)} != {list(NERF_SYNTHETIC)}")
    if problems:
        raise ManifestError(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return manifest


def _toy_caption_problems(edit: dict) -> list:
    """Toy-world prompts must be captions the toy world can build and judge."""
    from piva.toyworld.scenes import Scene

    out = []
    for key in ("source_prompt", "target_prompt"):
        try:
            Scene.from_caption(str(edit.get(key, "")))
        except ValueError as exc:
            out.append(f"edit {edit.get('id')!r} {key}: {exc}")
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    path = Path(args[0]) if args else HERE / "manifest.json"
    try:
        m = validate(path, full_benchmark="--full-benchmark" in sys.argv or not args)
    except ManifestError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        sys.exit(1)
    types = Counter(e["type"] for e in m["edits"])
    print(f"{path}: valid - {len(m['objects'])} objects, {len(m['edits'])} edits {dict(types)}")
