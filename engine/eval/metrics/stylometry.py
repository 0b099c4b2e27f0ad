"""A stylometric profile of a text, of a set of texts, and a distance to the person's style.

Features of one text (all plain numbers; a text with no words gives zeros):

==========================  ====================================================================
``mean_sentence_words``     words / sentences. Sentences are the pieces between ``.``, ``!``,
                            ``?`` (followed by space or the end) and line breaks that contain a
                            word, so a greeting line ("Hi Sam,") or a sign-off counts as one.
``mean_word_length``        mean characters per word (apostrophes not counted)
``punctuation_rate``        punctuation characters (Unicode category P) per word
``exclamation_rate``        ``!`` characters per sentence
``question_rate``           ``?`` characters per sentence
``contraction_rate``        contractions per word: words ending in n't, 're, 've, 'll, 'm, 'd,
                            and 's after a pronoun or there/here/what/let (not possessives)
``capitalised_word_rate``   words starting with a capital letter, per word ("I" included)
``first_person_rate``       I, me, my, mine, myself (and their contractions) per word
``has_greeting``            1 if the first line opens with a greeting (Hi, Hello, Hey, Dear, ...)
``has_signoff``             1 if one of the last two lines is a short sign-off (Best, Thanks,
                            Cheers, Regards, Sincerely, ...)
``paragraphs``              blocks separated by blank lines
``length_words``            number of words
==========================  ====================================================================

Words are runs of letters/digits with inner apostrophes (``can't`` is one word).

Distance of a set of texts S to the person's texts P (:func:`style_distance`)::

    z_f   = |mean_f(S) - mean_f(P)| / max(sd_f(P), FLOORS[f])
    d     = mean over features f of z_f

``sd_f(P)`` is the sample standard deviation of the person's own texts (0 with one text).
The floor keeps a feature the person never varies (always greets: sd 0) from dominating:
with the greeting floor 0.25, never greeting when the person always does costs 4. d = 0 is
the person's own average; about 1 means a typical feature is one of the person's own
standard deviations away.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence

FEATURES: tuple[str, ...] = (
    "mean_sentence_words",
    "mean_word_length",
    "punctuation_rate",
    "exclamation_rate",
    "question_rate",
    "contraction_rate",
    "capitalised_word_rate",
    "first_person_rate",
    "has_greeting",
    "has_signoff",
    "paragraphs",
    "length_words",
)

# The smallest spread each feature is scaled by (in the feature's own unit).
FLOORS: dict[str, float] = {
    "mean_sentence_words": 2.0,
    "mean_word_length": 0.2,
    "punctuation_rate": 0.02,
    "exclamation_rate": 0.05,
    "question_rate": 0.05,
    "contraction_rate": 0.01,
    "capitalised_word_rate": 0.02,
    "first_person_rate": 0.01,
    "has_greeting": 0.25,
    "has_signoff": 0.25,
    "paragraphs": 0.5,
    "length_words": 10.0,
}

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_CONTRACTION = re.compile(
    r"(?:n['’]t|['’](?:re|ve|ll|m|d))$|^(?:it|that|there|here|what|who|where|he|she|let|how)['’]s$",
    re.IGNORECASE,
)
_FIRST_PERSON = re.compile(r"^(?:i|me|my|mine|myself)(?:['’](?:m|ve|ll|d))?$", re.IGNORECASE)
_GREETING = re.compile(
    r"^(?:hi|hello|hey|hiya|dear|greetings|good\s+(?:morning|afternoon|evening)|yo)\b",
    re.IGNORECASE,
)
_SIGNOFF = re.compile(
    r"^(?:best|thanks|thank\s+you|many\s+thanks|cheers|regards|kind\s+regards|best\s+regards|"
    r"warm\s+regards|warmly|sincerely|yours|all\s+the\s+best|take\s+care|talk\s+soon|love|"
    r"xo|xx|speak\s+soon|see\s+you)\b",
    re.IGNORECASE,
)


def words_of(text: str) -> list[str]:
    return _WORD.findall(text)


def sentences_of(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_SPLIT.split(text) if _WORD.search(s)]


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def has_greeting(text: str) -> bool:
    lines = _lines(text)
    return bool(lines) and bool(_GREETING.match(lines[0]))


def has_signoff(text: str) -> bool:
    return any(_SIGNOFF.match(line) and len(words_of(line)) <= 4 for line in _lines(text)[-2:])


def text_profile(text: str) -> dict[str, float]:
    """The features of :data:`FEATURES` for one text (see the module docstring)."""
    words = words_of(text)
    if not words:
        return dict.fromkeys(FEATURES, 0.0)
    n_words = len(words)
    n_sentences = max(1, len(sentences_of(text)))
    punctuation = sum(1 for ch in text if unicodedata.category(ch).startswith("P"))
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    return {
        "mean_sentence_words": n_words / n_sentences,
        "mean_word_length": sum(len(w.replace("'", "").replace("’", "")) for w in words) / n_words,
        "punctuation_rate": punctuation / n_words,
        "exclamation_rate": text.count("!") / n_sentences,
        "question_rate": text.count("?") / n_sentences,
        "contraction_rate": sum(bool(_CONTRACTION.search(w)) for w in words) / n_words,
        "capitalised_word_rate": sum(w[0].isupper() for w in words) / n_words,
        "first_person_rate": sum(bool(_FIRST_PERSON.match(w)) for w in words) / n_words,
        "has_greeting": float(has_greeting(text)),
        "has_signoff": float(has_signoff(text)),
        "paragraphs": float(len(paragraphs)),
        "length_words": float(n_words),
    }


def profile_of(texts: Sequence[str]) -> dict[str, float]:
    """Mean of each feature over ``texts`` (zeros for no texts)."""
    if not texts:
        return dict.fromkeys(FEATURES, 0.0)
    profiles = [text_profile(t) for t in texts]
    return {f: sum(p[f] for p in profiles) / len(profiles) for f in FEATURES}


def spread_of(texts: Sequence[str]) -> dict[str, float]:
    """Sample standard deviation of each feature over ``texts`` (0 with fewer than 2)."""
    if len(texts) < 2:
        return dict.fromkeys(FEATURES, 0.0)
    profiles = [text_profile(t) for t in texts]
    out = {}
    for f in FEATURES:
        values = [p[f] for p in profiles]
        mean = sum(values) / len(values)
        out[f] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return out


def style_distance_by_feature(
    texts: Sequence[str], person_texts: Sequence[str], floors: Mapping[str, float] = FLOORS
) -> dict[str, float]:
    """z_f of every feature: |mean_f(texts) - mean_f(person)| / max(sd_f(person), floor_f)."""
    mine, theirs, spread = profile_of(texts), profile_of(person_texts), spread_of(person_texts)
    return {f: abs(mine[f] - theirs[f]) / max(spread[f], floors[f]) for f in FEATURES}


def style_distance(
    texts: Sequence[str], person_texts: Sequence[str], floors: Mapping[str, float] = FLOORS
) -> float:
    """Mean z-scored distance of ``texts`` to the person's texts (0 = the person's average)."""
    if not texts or not person_texts:
        raise ValueError("style_distance needs at least one text on each side")
    by_feature = style_distance_by_feature(texts, person_texts, floors)
    return sum(by_feature.values()) / len(by_feature)
