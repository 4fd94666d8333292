"""Kept so `python benchmark/noe/validate.py [MANIFEST] [--full-benchmark]` still works: the validator is piva.noe.validate."""

import sys
from pathlib import Path

from piva.noe.validate import ManifestError, main, validate  # noqa: F401 (re-exported for old imports)

if __name__ == "__main__":
    sys.exit(main(default=Path(__file__).with_name("manifest.json")))
