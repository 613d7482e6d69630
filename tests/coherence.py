"""A deliberately simple check that text reads as English: enough words, mostly common ones.

It tells a real language model's continuation from random-weight output (byte soup and
word fragments); it is not a quality measure.
"""

from __future__ import annotations

import re

COMMON = frozenset("""
a about after again all also always an and another any are around as at away back be
because been before being best better between big boy but by called came can city could
day days did do does dog down each end even ever every family father few find first for
found friend friends from get girl give go going good great had happy has have he her here
him his home house how i if in into is it its just king know land last life like little
live lived long look loved made make man many may me men more most mother much must my name
named never new next night no not nothing now of off old on once one only or other our out
over own people place play played queen said same saw say school see she should small so
some something still story such take than that the their them then there these they thing
things think this those three through time to told too town two under until up upon us very
village want was water way we well went were what when where which while who will wise with
woman world would year years you young your
""".split())


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())


def is_coherent(text: str, *, min_words: int = 8, min_common: float = 0.5) -> bool:
    """True when `text` has at least `min_words` words, most of its characters are letters,
    spaces or punctuation, and at least `min_common` of its words are common English words."""
    found = words(text)
    if len(found) < min_words:
        return False
    printable = sum(ch.isalpha() or ch.isspace() or ch in ".,;:!?'\"-()" for ch in text)
    if printable < 0.9 * len(text):
        return False
    return sum(w in COMMON for w in found) / len(found) >= min_common


def repeated_sentences(text: str) -> int:
    """How many sentences or lines (split at . ! ? and new lines, case and spaces folded) say
    again one said before: the measure of a model looping ("While I was looking for a place."
    sixteen times is 15; so is a bare "*" on sixteen lines)."""
    seen: set[str] = set()
    repeats = 0
    for sentence in re.split(r"[.!?\n]+", text.lower()):
        sentence = " ".join(sentence.split())
        if sentence:
            repeats += sentence in seen
            seen.add(sentence)
    return repeats
