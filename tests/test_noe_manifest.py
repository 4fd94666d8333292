"""The Noe manifest and its validator."""

import copy
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from piva.noe.validate import ManifestError, load_schema, main, validate

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = json.loads((ROOT / "benchmark" / "noe" / "manifest.json").read_text())
CANDIDATES = ROOT.parent / "shared" / "data" / "objaverse-candidates.tsv"


def test_the_manifest_is_the_full_benchmark():
    m = validate(MANIFEST, full_benchmark=True)
    assert "reconstructed" in m["note"].lower()
    assert sum(o["source"] == "objaverse" for o in m["objects"]) == 27
    assert len({o["category"] for o in m["objects"] if o["source"] == "objaverse"}) >= 7
    prompts = " ".join(e["source_prompt"] + " " + e["target_prompt"] for e in m["edits"]).lower()
    for example in ("flower box", "pink flamingo", "knight riding a horse", "round cake", "car", "lantern",
                    "plate of hot dogs", "armoured tank"):
        assert example in prompts, example


@pytest.mark.skipif(not CANDIDATES.is_file(), reason="shared/ not beside the checkout")
def test_every_uid_comes_from_the_candidate_list():
    uids = {r["uid"] for r in csv.DictReader(CANDIDATES.open(), delimiter="\t")}
    assert all(o["uid"] in uids for o in MANIFEST["objects"] if o["source"] == "objaverse")


def broken(change):
    m = copy.deepcopy(MANIFEST)
    change(m)
    return m


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["edits"][0].update(type="recolouring"), "is not one of"),
        (lambda m: m["edits"][0].update(target_prompt="  "), "does not match"),
        (lambda m: m["edits"][1].pop("instruction"), "'instruction' is a required property"),
        (lambda m: m["edits"].append(dict(m["edits"][0])), "duplicate edit id"),
        (lambda m: m["objects"][10].update(uid="not-a-uid"), "does not match"),
        (lambda m: m["edits"][0].update(object="nope"), "unknown object"),
        (lambda m: m.update(edits=[e for e in m["edits"] if not (e["object"] == "chair" and e["type"] == "addition")]),
         "object 'chair' has no addition edit"),
    ],
)
def test_validator_rejects_bad_entries(change, message):
    with pytest.raises(ManifestError, match=message):
        validate(broken(change), full_benchmark=True)


def test_a_subset_need_not_have_every_edit_type():
    """Noe's every-type-per-object rule holds for the full benchmark only (a user's subset, the toy manifest)."""
    subset = broken(lambda m: m.update(edits=[e for e in m["edits"] if not (e["object"] == "chair" and e["type"] == "addition")]))
    validate(subset)
    with pytest.raises(ManifestError, match="object 'chair' has no addition edit"):
        validate(subset, full_benchmark=True)


def test_the_old_type_name_translation_still_loads(tmp_path, capsys):
    """The paper's Noe calls a shape change "translation": a manifest that does is valid, read as "shape-change",
    and `--types translation` still selects those edits."""
    from piva.noe.runner import select_edits

    old = broken(lambda m: [e.update(type="translation") for e in m["edits"] if e["type"] == "shape-change"])
    assert sum(e["type"] == "translation" for e in old["edits"]) == 35
    loaded = validate(old, full_benchmark=True)  # Noe's every-type rule counts it as the shape change
    assert {e["type"] for e in loaded["edits"]} == {"texturing", "addition", "shape-change"}
    assert sum(e["type"] == "translation" for e in old["edits"]) == 35  # the input is left as it was
    assert len(select_edits(loaded, types=["translation"])) == len(select_edits(loaded, types=["shape-change"])) == 35
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    assert main([str(path)]) == 0
    assert "'shape-change': 35" in capsys.readouterr().out


def test_stored_results_with_the_old_type_name_join_the_shape_changes(tmp_path):
    from piva.noe.leaderboard import load_results

    for name, kind in (("a", "translation"), ("b", "shape-change")):
        path = tmp_path / "results" / "piva" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"method": "piva", "edit": {"id": name, "type": kind, "source_prompt": "x",
                                                               "target_prompt": "y"},
                                    "metrics": {"psnr": 20.0}, "wall_time_s": 1.0, "peak_memory": {},
                                    "thumbnail": f"{name}.png"}))
    rows = load_results(tmp_path)
    assert [(r["type"], r["edit"]["type"]) for r in rows] == [("shape-change", "shape-change")] * 2


def test_the_schema_is_package_data():
    import importlib.resources

    assert (importlib.resources.files("piva.noe") / "manifest.schema.json").is_file()
    assert load_schema()["$schema"].endswith("2020-12/schema")
    assert not (ROOT / "benchmark" / "noe" / "manifest.schema.json").exists()  # one copy only


def test_toy_manifest_is_valid_and_checked_for_toy_captions():
    toy = json.loads((ROOT / "benchmark" / "noe" / "toy-manifest.json").read_text())
    validate(toy)
    assert len(toy["objects"]) >= 8 and len(toy["edits"]) >= 24
    counts = {t: sum(e["type"] == t for e in toy["edits"]) for t in ("texturing", "addition", "shape-change")}
    assert len(set(counts.values())) == 1, counts  # spread evenly over the three types
    bad = copy.deepcopy(toy)
    bad["edits"][0]["target_prompt"] = "a teapot on fire"
    with pytest.raises(ManifestError, match="not a toy-world caption"):
        validate(bad)
    bad["edits"][0]["target_prompt"] = "a red cube on a white plate with a black hat"
    with pytest.raises(ManifestError, match="at most one"):
        validate(bad)


def test_cli_exit_codes(tmp_path, capsys):
    assert main([str(ROOT / "benchmark" / "noe" / "manifest.json"), "--full-benchmark"]) == 0
    assert "valid - 35 objects, 112 edits" in capsys.readouterr().out
    broken_file = tmp_path / "m.json"
    broken_file.write_text(json.dumps(broken(lambda m: m["edits"][0].update(object="nope"))))
    assert main([str(broken_file)]) == 1
    assert "unknown object" in capsys.readouterr().err
    # The old entry point still works, without any sys.path editing.
    run = subprocess.run([sys.executable, str(ROOT / "benchmark" / "noe" / "validate.py")], capture_output=True,
                         text=True, cwd=tmp_path)
    assert run.returncode == 0 and "valid - 35 objects" in run.stdout, run.stderr


def test_a_users_manifest_needs_only_what_the_runner_reads(tmp_path):
    """The README's sample (meshes with and without materials, a folder of posed RGBA images) validates as it is;
    Noe's bookkeeping fields are not asked for, and what the runner does read gets one line each."""
    sample = json.loads((ROOT / "examples" / "my-objects.json").read_text())
    assert not any(k in sample for k in ("version", "note"))
    assert not any("license" in o or "category" in o for o in sample["objects"])
    validate(sample)
    with pytest.raises(ManifestError, match="'version' is a required property"):
        validate(sample, full_benchmark=True)
    bad = json.loads(json.dumps(sample))
    bad["objects"][0].pop("path")
    bad["edits"][0].pop("target_prompt")
    with pytest.raises(ManifestError) as err:
        validate(bad)
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 2 and any("'path' is a required property" in x for x in lines)
    assert any("'target_prompt' is a required property" in x for x in lines)
    (tmp_path / "broken.json").write_text("{ not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        validate(tmp_path / "broken.json")


@pytest.mark.parametrize("bad", ["teddy@seed1", ".hidden", "a/b", "a b", "", "tëddy", "x:y"])
@pytest.mark.parametrize("kind", ["objects", "edits"])
def test_ids_must_be_safe_path_parts(kind, bad):
    """Object and edit ids become folder names, unquoted config values and `<edit>@seed1` result names: one
    line per bad id, saying what to use."""
    sample = json.loads((ROOT / "examples" / "my-objects.json").read_text())
    item = sample[kind][0]
    if kind == "objects" and bad:
        for e in sample["edits"]:
            if e["object"] == item["id"]:
                e["object"] = bad  # the edits follow the object, so the id is the only problem
    item["id"] = bad
    with pytest.raises(ManifestError) as err:
        validate(sample)
    lines = [x.strip() for x in str(err.value).splitlines()]
    id_lines = [x for x in lines if x.startswith(f"{kind}/0/id:")]
    assert len(id_lines) == 1 and (bad == "" or lines[0] == "1 problem(s):"), lines  # "": edits name no object
    assert id_lines[0] == (f"{kind}/0/id: id {bad!r} is not usable: ids become folder names and config values, "
                                "so use letters, digits, '_', '-' and '.' only, not starting with '.' ('@' is "
                                "reserved for seeds: <edit>@seed1)")


def test_every_bundled_manifest_has_safe_ids():
    import re

    for path in (ROOT / "benchmark" / "noe" / "manifest.json", ROOT / "benchmark" / "noe" / "toy-manifest.json",
                 ROOT / "examples" / "my-objects.json"):
        m = validate(path, full_benchmark=path.name == "manifest.json")
        ids = [x["id"] for x in m["objects"] + m["edits"]]
        assert all(re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", i) for i in ids), path
    ok = json.loads((ROOT / "examples" / "my-objects.json").read_text())
    ok["objects"][0]["id"] = "v1.2_teddy-B"  # dots inside, underscores, dashes and capitals are fine
    for e in ok["edits"]:
        if e["object"] == "teddy":
            e["object"] = "v1.2_teddy-B"
    validate(ok)


def test_edits_are_picked_by_id_and_an_unknown_id_is_named(tmp_path, capsys):
    """`--edits` runs exactly the named edits (with the other filters), and a typo is an error naming it."""
    import sys

    from piva.noe.runner import select_edits

    toy = json.loads((ROOT / "benchmark" / "noe" / "toy-manifest.json").read_text())
    ids = ["toy-green-sphere-addition-0", "toy-red-cube-texturing-0"]
    assert [e["id"] for e in select_edits(toy, ids=ids)] == ids[::-1]  # the manifest's order
    assert [e["id"] for e in select_edits(toy, types=["addition"], ids=ids)] == ids[:1]
    with pytest.raises(ValueError, match="no edit toy-red-cube-texturing-9 in the manifest"):
        select_edits(toy, ids=["toy-red-cube-texturing-9", ids[0]])
    sys.path.insert(0, str(ROOT / "benchmark"))
    try:
        import run
    finally:
        sys.path.pop(0)
    assert run.main(["--toy", "--out", str(tmp_path), "--edits", "toy-red-cube-texturing-9"]) == 2
    assert "toy-red-cube-texturing-9" in capsys.readouterr().err and not any(tmp_path.iterdir())


IN2N = json.loads((ROOT / "benchmark" / "noe" / "in2n-manifest.json").read_text())


def test_the_in2n_manifest_is_the_paper_s_real_scene_protocol():
    """PiVa table 3: 9 edits of IN2N's face capture and 3 of its bear capture (grizzly, polar bear, panda), with
    the paper's four rows as printed; captures with a download link; the face edits flagged as of a person."""
    m = validate(IN2N)
    assert m["name"] == "in2n" and "reconstructed" in m["note"].lower()
    per_object = {o["id"]: sum(e["object"] == o["id"] for e in m["edits"]) for o in m["objects"]}
    assert per_object == {"face": 9, "bear": 3}
    objects = {o["id"]: o for o in m["objects"]}
    assert all(o["source"] == "capture" and o["path"] and o["url"].startswith("https://") for o in objects.values())
    assert objects["face"]["people"] is True and not objects["bear"].get("people")
    bear = " ".join(e["target_prompt"] for e in m["edits"] if e["object"] == "bear")
    assert all(kind in bear for kind in ("grizzly bear", "polar bear", "panda"))
    assert m["reported"]["source"] == "PiVa paper, table 3"
    assert m["reported"]["rows"] == {"in2n": {"clip_score": 0.238, "photo_psnr": 15.84, "photo_lpips": 0.356},
                                     "dds": {"clip_score": 0.225, "photo_psnr": 16.05, "photo_lpips": 0.394},
                                     "pds": {"clip_score": 0.248, "photo_psnr": 17.56, "photo_lpips": 0.392},
                                     "piva": {"clip_score": 0.250, "photo_psnr": 18.60, "photo_lpips": 0.312}}
    with pytest.raises(ManifestError, match="Noe has 35 objects"):  # Noe's own counts are not asked of it
        validate(IN2N, full_benchmark=True)


def test_noe_keeps_its_reported_rows_in_its_manifest():
    """One place for a paper's figures: the manifest they were measured on (Noe: table 2)."""
    assert MANIFEST["reported"]["source"] == "PiVa paper, table 2"
    assert MANIFEST["reported"]["rows"] == {"dds": {"clip_score": 0.242, "lpips": 0.1918},
                                           "piva": {"clip_score": 0.245, "lpips": 0.1133}}


@pytest.mark.parametrize("rows, message", [({}, "should be non-empty"), ({"piva": {"clip": 0.2}}, "unknown figure"),
                                           ({"piva": {"psnr": "18.6"}}, "is not of type")])
def test_reported_rows_must_be_figures_the_leaderboard_shows(rows, message):
    bad = copy.deepcopy(IN2N)
    bad["reported"]["rows"] = rows
    with pytest.raises(ManifestError, match=message):
        validate(bad)
