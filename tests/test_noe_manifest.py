"""The Noe manifest and its validator."""

import copy
import csv
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmark" / "noe"))
from validate import ManifestError, validate  # noqa: E402

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
        validate(broken(change))
