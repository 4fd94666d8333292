"""The README's commands parse with the real command lines, and every relative link in the docs resolves.

A renamed flag, method or script, a moved doc or a renamed heading fails here, before a user meets it.
Nothing is run: each command is parsed by the parser its program uses (argparse for `piva` and
`benchmark/run.py`; the registered nerfstudio configs, which tyro turns into `ns-train` flags).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "piva" / "threestudio" / "README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# Flags of nested configs, as `ns-train` spells them, wherever the README names one on its own.
NESTED_FLAG = re.compile(r"^--(?:pipeline|machine|target-only-lr-scales|optimizers)\.[\w.-]+$")


# ------------------------------------------------------------------------------------------------ commands
def fenced_blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def shell_commands(text: str) -> list[list[str]]:
    """Every command of the bash blocks (continuation lines joined, comments dropped, `&&` chains split) and of
    the inline code spans that start with a command piva ships."""
    lines = []
    for block in fenced_blocks(text, "bash"):
        lines += block.replace("\\\n", " ").splitlines()
    starts = ("piva ", ".venv/bin/piva ", "ns-train ", "python benchmark/", ".venv/bin/python benchmark/",
              "python -m piva", "python scripts/", ".venv/bin/python scripts/", "bash scripts/")
    prose = FENCE.sub("", text)
    lines += [span for span in re.findall(r"`([^`\n]+)`", prose) if span.startswith(starts)]
    commands = []
    for line in lines:
        tokens = [t.strip("[]") for t in shlex.split(line, comments=True)]
        while "&&" in tokens:
            cut = tokens.index("&&")
            commands.append(tokens[:cut])
            tokens = tokens[cut + 1:]
        if tokens:
            commands.append(tokens)
    return commands


def inline_flags(text: str) -> list[str]:
    """Nested `ns-train` flags the prose names in code spans (`--pipeline.guidance.same-latent True`)."""
    prose = FENCE.sub("", text)
    return sorted({tok for span in re.findall(r"`([^`\n]+)`", prose) for tok in span.split() if NESTED_FLAG.match(tok)})


@lru_cache(maxsize=None)
def benchmark_parser():
    spec = importlib.util.spec_from_file_location("benchmark_run_for_readme", ROOT / "benchmark" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


@lru_cache(maxsize=None)
def ns_methods() -> dict:
    from piva.nerfstudio.piva_config import METHODS, SOURCE_METHODS

    return {name: spec.config for name, spec in {**METHODS, **SOURCE_METHODS}.items()}


def resolve_flag(config, flag: str):
    """The config value an `ns-train` flag sets (tyro: `--a.b-c` is `config.a.b_c`, a dict's keys nest too)."""
    node = config
    for part in flag[2:].split("."):
        key = part.replace("-", "_")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif not isinstance(node, dict) and hasattr(node, key):
            node = getattr(node, key)
        else:
            raise AssertionError(f"{flag}: no {key!r} in {type(node).__name__}")
    return node


def parse_with(parser, args: list[str], command: str) -> object:
    try:
        return parser.parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"{command!r} does not parse (exit {exc.code})") from None


def check_command(tokens: list[str]) -> str | None:
    """Assert that one command is valid; returns what checked it (None: a command piva does not own)."""
    command = " ".join(tokens)
    program, args = tokens[0], [t for t in tokens[1:] if t not in ("--help", "-h")]  # help forms: the rest parses
    if program in ("piva", ".venv/bin/piva"):
        from piva.cli import build_parser

        parse_with(build_parser(), [a for a in args if a != "..."], command)
        return "piva"
    if program in ("python", ".venv/bin/python", "python3"):
        if args[:1] == ["-m"]:
            module = args[1]
            if module == "pytest":
                return "pytest"
            if module.startswith("piva"):
                assert importlib.util.find_spec(module) is not None, f"{command!r}: no module {module}"
                return "module"
            return None
        script = args[0]
        if script.startswith(("benchmark/", "scripts/")):
            assert (ROOT / script).is_file(), f"{command!r}: {script} is not in the repository"
            if script == "benchmark/run.py":
                parsed = parse_with(benchmark_parser(), args[1:], command)
                if parsed.backend == "threestudio":
                    assert parsed.threestudio, f"{command!r}: --backend threestudio exits without --threestudio PATH"
                return "benchmark"
            return "script"
        return None
    if program == "bash" and args and args[0].startswith("scripts/"):
        assert (ROOT / args[0]).is_file(), f"{command!r}: {args[0]} is not in the repository"
        return "script"
    if program == "ns-train":
        method, flags = args[0], [a for a in args[1:] if a.startswith("--")]
        if method in ("nerfacto", "splatfacto"):
            return None
        assert method in ns_methods(), f"{command!r}: no registered method {method!r}"
        for flag in flags:
            resolve_flag(ns_methods()[method], flag)
        return "ns-train"
    return None


def readme_commands() -> list[list[str]]:
    return shell_commands(README.read_text())


def test_the_readme_commands_parse():
    checked = [check_command(tokens) for tokens in readme_commands()]
    # The commands the README must show (a README without them passes nothing here).
    for kind in ("piva", "benchmark", "ns-train", "pytest", "script", "module"):
        assert kind in checked, kind
    assert checked.count("benchmark") >= 4 and checked.count("piva") >= 3


def test_the_flags_the_readme_names_exist():
    flags = inline_flags(README.read_text())
    assert len(flags) >= 10, flags
    configs = ns_methods().values()
    for flag in flags:
        found = []
        for config in configs:
            try:
                resolve_flag(config, flag)
                found.append(True)
            except AssertionError:
                pass
        assert found, f"{flag}: not a flag of any registered ns-train method"


def test_the_readme_setup_and_test_commands_are_what_ci_runs():
    first_block = fenced_blocks(README.read_text(), "bash")[0]
    lines = [shlex.split(line, comments=True) for line in first_block.splitlines()]
    ci = [shlex.split(line, comments=True) for line in (ROOT / ".ci" / "run").read_text().replace("\\\n", " ").splitlines()]
    assert lines[0] == ["bash", "scripts/setup.sh"] and lines[0] in ci
    assert lines[2] == [".venv/bin/python", "-m", "pytest", "-q"] and lines[2] in ci
    assert lines[1] == [".venv/bin/piva", "demo"]
    assert 'piva = "piva.cli:main"' in (ROOT / "pyproject.toml").read_text()


def test_the_readme_python_compiles_and_stays_short():
    for block in fenced_blocks(README.read_text(), "python"):
        compile(block, "README.md", "exec")
    assert len(README.read_text().splitlines()) <= 200


def test_a_bad_command_fails_the_check():
    """The checks can fail: a misspelt flag, an unknown method, a threestudio run without its checkout."""
    for bad in (["ns-train", "piva", "--pipeline.guidance.source-promt", "x"],
                ["ns-train", "piva-large", "--data", "D"],
                [".venv/bin/piva", "demo", "--sed", "0"],
                ["python", "benchmark/run.py", "--toy", "--backend", "threestudio"],
                ["python", "scripts/no_such_script.py"]):
        with pytest.raises(AssertionError):
            check_command(bad)


# ------------------------------------------------------------------------------------------------ links
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation and symbols dropped, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    keep = [c for c in text if c in " -_" or unicodedata.category(c)[:2] in ("Lu", "Ll", "Lt", "Lm", "Lo", "Nd",
                                                                            "Nl", "Mn", "Mc")]
    return "".join(keep).replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset:
    seen: dict = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)
    found = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text) + re.findall(r"<img[^>]*\ssrc=\"([^\"]+)\"", text)
    return [t for t in found if not re.match(r"^[a-z]+:", t)]


def check_link(source: Path, target: str) -> None:
    where, _, anchor = target.partition("#")
    file = (source.parent / where).resolve() if where else source
    assert file.exists(), f"{source.relative_to(ROOT)}: {target} -> no such file"
    assert ROOT in file.parents or file == ROOT, f"{source.relative_to(ROOT)}: {target} points outside the repository"
    if anchor:
        assert file.suffix == ".md", f"{source.relative_to(ROOT)}: {target}: an anchor into a file that is not markdown"
        assert anchor in anchors(file), f"{source.relative_to(ROOT)}: {target}: no heading with anchor #{anchor}"


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    targets = links(doc)
    for target in targets:
        check_link(doc, target)
    if doc == README:
        assert len(targets) >= 8, targets


def test_the_docs_cited_in_the_code_have_the_cited_headings():
    """Docstrings and comments cite `docs/X.md#anchor`: the heading must exist."""
    cited = 0
    for path in [*ROOT.glob("piva/**/*.py"), *ROOT.glob("piva/**/*.yaml"), *ROOT.glob("benchmark/**/*.py"),
                 ROOT / "piva" / "toyworld" / "weights" / "prior" / "piva.json"]:
        for doc, anchor in re.findall(r"docs/(\w+\.md)#([\w-]+)", path.read_text()):
            assert (ROOT / "docs" / doc).is_file(), f"{path.relative_to(ROOT)}: docs/{doc} does not exist"
            assert anchor in anchors(ROOT / "docs" / doc), f"{path.relative_to(ROOT)}: docs/{doc}#{anchor}"
            cited += 1
    assert cited >= 5


def test_a_broken_link_fails_the_check():
    with pytest.raises(AssertionError, match="no such file"):
        check_link(README, "docs/no-such-page.md")
    with pytest.raises(AssertionError, match="no heading"):
        check_link(README, "docs/toyworld.md#no-such-heading")
    assert slug("A splat edit at 512² on a GPU (budget, not measured)") == "a-splat-edit-at-512-on-a-gpu-budget-not-measured"
    assert slug("A longer score phase: the toy preset's 450 steps") == "a-longer-score-phase-the-toy-presets-450-steps"
