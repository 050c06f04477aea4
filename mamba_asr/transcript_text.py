"""Transcripts normalised to the characters a recipe's outputs cover.

:func:`normalise` applies, in order: Unicode NFKC; upper-case (lower-case when the character set
has lower-case letters and no upper-case ones, neither when it has both); curly and other
typographic single quotes to ``'`` (a quote mark standing alone dropped); hyphens, dashes and
slashes to a space; accents stripped where that gives an allowed letter (``É`` -> ``E``); other
punctuation dropped, except ``& % @ #``, which are read out; whitespace collapsed. What is still
outside the set (digits, symbols, other scripts) is not guessed: :func:`normalise` returns the
text with the first offending character, and :func:`problem` says what it is and what to do.
"""

from __future__ import annotations

import unicodedata

# The characters of the LibriSpeech recipes (hparams/CTC/*.yaml ``characters``): what the
# SentencePiece vocabularies of the S2S recipes are trained on too.
LIBRISPEECH_CHARACTERS = " 'ABCDEFGHIJKLMNOPQRSTUVWXYZ"
APOSTROPHES = "'\u2018\u2019\u201a\u201b\u2032\u02bc\u0060\u00b4"  # ' ‘ ’ ‚ ‛ ′ ʼ ` ´
SPOKEN_PUNCTUATION = "&%@#"  # read out ("and", "percent", ...): never dropped silently
SEPARATORS = "-/\\\u2010\u2011\u2012\u2013\u2014\u2015\u2212"  # - / \ ‐ ‑ ‒ – — ― −


def _case(characters: str):
    """The case mapping that makes letters comparable with ``characters``."""
    upper = any(c.isupper() for c in characters)
    lower = any(c.islower() for c in characters)
    if upper and not lower:
        return str.upper
    if lower and not upper:
        return str.lower
    return lambda s: s


def _strip_accents(char: str) -> str:
    """``char`` without its combining marks (``É`` -> ``E``); ``char`` if it has none."""
    base = "".join(c for c in unicodedata.normalize("NFD", char) if not unicodedata.combining(c))
    return base or char


def normalise(text: str, characters: str) -> tuple[str, str | None]:
    """``(normalised text, None)``, or ``(partly normalised text, offending character)`` when
    a character outside ``characters`` remains (see the module's rules)."""
    allowed = set(characters)
    case = _case(characters)
    out = []
    for char in case(unicodedata.normalize("NFKC", text)):
        if char in allowed:
            out.append(char)
        elif char in APOSTROPHES:
            out.append("'" if "'" in allowed else "")
        elif char in SEPARATORS or char.isspace():
            out.append(" ")
        elif unicodedata.category(char).startswith("P") and char not in SPOKEN_PUNCTUATION:
            continue
        else:
            out.append(case(_strip_accents(char)))
    words = "".join(out).split()
    clean = " ".join(w for w in words if w.strip("'"))  # a quote mark alone is no word
    bad = next((c for c in clean if c not in allowed), None)
    return clean, bad


def problem(char: str) -> str:
    """Why ``char`` is left in a transcript and how the user can fix it."""
    name = unicodedata.name(char, f"U+{ord(char):04X}")
    if char.isdigit():
        return "digits: write numbers as words"
    category = unicodedata.category(char)
    if category.startswith("S") or char in SPOKEN_PUNCTUATION:
        return f"symbol {name}: write it as words or remove it"
    if category.startswith("L"):
        return f"letter {name} is not among the model's characters"
    return f"{name} is not among the model's characters"
