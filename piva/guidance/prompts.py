"""What a pair of prompts says about an edit, for rules that every front end applies the same way."""

from __future__ import annotations

import re

# Basic colour terms (Berlin & Kay's eleven and common variants) plus light/dark modifiers.
COLOUR_WORDS = frozenset(
    "black white red green yellow blue brown purple pink orange grey gray golden gold silver "
    "cyan magenta violet beige turquoise teal navy maroon crimson light dark pale bright".split()
)


def _words(prompt: str) -> list[str]:
    return re.findall(r"[a-z]+", prompt.lower())


def is_colour_only_edit(source_prompt: str, target_prompt: str) -> bool:
    """True when the prompts differ, word for word, only in colour words ("a red cube" -> "a blue cube"):
    such an edit needs no new geometry, so the scene's density can stay as captured."""
    src, tgt = _words(source_prompt), _words(target_prompt)
    if len(src) != len(tgt) or src == tgt:
        return False
    return all(a == b or (a in COLOUR_WORDS and b in COLOUR_WORDS) for a, b in zip(src, tgt))


def adds_to_source(source_prompt: str, target_prompt: str) -> bool:
    """True when the target keeps every source word, in order, and only adds words ("a red cube" ->
    "a red cube on a white plate"): the edit adds a part and leaves the rest as described, so it may use
    the strong guidance that grows new geometry without reshaping what is there."""
    src, tgt = _words(source_prompt), _words(target_prompt)
    if len(tgt) <= len(src):
        return False
    rest = iter(tgt)
    return all(word in rest for word in src)  # an ordered subsequence: `in` consumes the iterator
