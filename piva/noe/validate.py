"""Validate a Noe-style manifest: the JSON schema, then the rules a schema cannot state.

    .venv/bin/python -m piva.noe.validate [MANIFEST] [--full-benchmark]

The schema ships inside the package (`manifest.schema.json` beside this file), so the
runner and the tests validate without the repository's benchmark/ folder on any path.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence, Union

NERF_SYNTHETIC = ("chair", "drums", "ficus", "hotdog", "lego", "materials", "mic", "ship")
TYPES = ("texturing", "addition", "shape-change")
TYPE_ALIASES = {"translation": "shape-change"}
"""Older names of an edit type, accepted wherever a type is read: the paper's Noe calls a shape change "translation"."""
DEFAULT_MANIFEST = Path("benchmark") / "noe" / "manifest.json"
"""The full benchmark's manifest, relative to a checkout (it is repository data, not package data)."""


def load_schema() -> dict:
    """The manifest's JSON schema (package data)."""
    return json.loads(resources.files("piva.noe").joinpath("manifest.schema.json").read_text())


# What the runner itself reads; the rest (version, note, category, license, instruction) is Noe's bookkeeping.
NOE_ONLY = {"": ("version", "note"), "objects": ("category", "license"), "edits": ("instruction",)}


def runner_schema() -> dict:
    """The schema for a user's manifest: only what `benchmark/run.py` uses is required."""
    schema = load_schema()
    schema["required"] = [k for k in schema["required"] if k not in NOE_ONLY[""]]
    for part in ("objects", "edits"):
        item = schema["properties"][part]["items"]
        item["required"] = [k for k in item["required"] if k not in NOE_ONLY[part]]
    return schema


class ManifestError(ValueError):
    """A manifest breaks the schema or a benchmark rule; the message lists every problem."""


def edit_type(name):
    """An edit type's name as piva spells it (`TYPES`), with an older name (`TYPE_ALIASES`) mapped to it."""
    return TYPE_ALIASES.get(name, name) if isinstance(name, str) else name


def normalise_types(manifest: dict) -> dict:
    """The manifest with every edit's type under its current name (a copy; the input stays as it was)."""
    edits = manifest.get("edits")
    if not isinstance(edits, list):
        return manifest
    return {**manifest, "edits": [{**e, "type": edit_type(e["type"])} if isinstance(e, dict) and "type" in e else e
                                  for e in edits]}


def validate(manifest: Union[dict, str, Path], full_benchmark: bool = False) -> dict:
    """Return the manifest, every edit type under its current name (`normalise_types`), if valid; raise
    ManifestError listing every problem otherwise."""
    import jsonschema

    if not isinstance(manifest, dict):
        try:
            manifest = json.loads(Path(manifest).read_text())
        except json.JSONDecodeError as exc:
            raise ManifestError(f"not valid JSON ({exc})") from None
    manifest = normalise_types(manifest)
    schema = load_schema() if full_benchmark else runner_schema()
    problems = [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {_message(e)}"
        for e in sorted(jsonschema.Draft202012Validator(schema).iter_errors(manifest), key=lambda e: list(e.path))
    ]
    problems += _reported_problems(manifest.get("reported"))
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
    if full_benchmark:  # Noe's own rule; a user's or the toy manifest may leave types out
        for oid in objects:
            missing = [t for t in TYPES if t not in by_object.get(oid, set())]
            if missing:
                problems.append(f"object {oid!r} has no {', '.join(missing)} edit")
        n_obj, n_edit = len(objects), len(manifest.get("edits", []))
        if (n_obj, n_edit) != (35, 112):
            problems.append(f"Noe has 35 objects and 112 edits, this manifest {n_obj} and {n_edit}")
        scenes = {o.get("scene") for o in objects.values() if o.get("source") == "nerf-synthetic"}
        if scenes != set(NERF_SYNTHETIC):
            problems.append(f"NeRF-synthetic scenes {sorted(scenes)} != {list(NERF_SYNTHETIC)}")
    if problems:
        raise ManifestError(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return manifest


def _message(error) -> str:
    """The schema's message, or for an id what to give instead of the pattern itself."""
    if error.validator == "pattern" and list(error.absolute_path)[-1:] == ["id"]:
        return (f"id {error.instance!r} is not usable: ids become folder names and config values, so use letters, "
                "digits, '_', '-' and '.' only, not starting with '.' ('@' is reserved for seeds: <edit>@seed1)")
    return error.message


def _reported_problems(reported) -> list:
    """A reported row's figures must be ones the leaderboard has a column for: a misspelt key would show as '–'."""
    from piva.noe.leaderboard import COLUMNS

    rows = reported.get("rows") if isinstance(reported, dict) else None
    known = {key for key, _, _ in COLUMNS}
    return [f"reported row {method!r}: unknown figure {key!r} (known: {', '.join(sorted(known))})"
            for method, row in (rows.items() if isinstance(rows, dict) else ()) if isinstance(row, dict)
            for key in row if key not in known]


def _toy_caption_problems(edit: dict) -> list:
    """Toy-world prompts must be captions the toy world can build and judge."""
    from piva.toyworld.scenes import Scene

    out = []
    for key in ("source_prompt", "target_prompt"):
        try:
            scene = Scene.from_caption(str(edit.get(key, "")))
        except ValueError as exc:
            out.append(f"edit {edit.get('id')!r} {key}: {exc}")
            continue
        if len(scene.parts) > 1:  # the toy prior and judge were trained on one part at most
            out.append(f"edit {edit.get('id')!r} {key}: {scene.caption!r} has {len(scene.parts)} parts; "
                       "the toy prior and judge know captions with at most one (plate, hat or stripe)")
    return out


def main(argv: Optional[Sequence[str]] = None, default: Path = DEFAULT_MANIFEST) -> int:
    """CLI: validate MANIFEST (default: the full benchmark's, checked as the full benchmark); 0 when valid."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in argv if not a.startswith("--")]
    path = Path(args[0]) if args else Path(default)
    try:
        m = validate(path, full_benchmark="--full-benchmark" in argv or not args)
    except (ManifestError, OSError, json.JSONDecodeError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    types = Counter(e["type"] for e in m["edits"])
    print(f"{path}: valid - {len(m['objects'])} objects, {len(m['edits'])} edits {dict(types)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
