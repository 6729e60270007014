"""Answer matching, pure Python (``re``, ``decimal``; no MLX): strict exact match, token F1, and
the flexible match of an answer extracted from a generated text. Recipe validation compiles the
extraction regex with it, so loading a recipe never imports MLX or mlx-lm.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from decimal import Decimal

from nrt_mlx.errors import NrtError

# ---- answer matching (SQuAD-style normalisation) ----------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised texts are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 = 2 P R / (P + R) of the normalised word multisets (P = common/|pred|, R = common/|ref|)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---- flexible match (lm-evaluation-harness's "flexible-extract" filter) --------------------------
# The harness's gsm8k task scores one generation twice: "strict-match" needs the answer in the
# format it asked for, "flexible-extract" takes the last number anywhere in the text (its regex with
# group_select -1) and compares it after dropping "," "$" and a final "."; text that yields nothing
# is "[invalid]", a miss. Here the strict figure is the whole normalised answer, the flexible one is
# the answer found in the text.

_NUMBER_IN_TEXT = re.compile(r"[-+]?\$?\d(?:[\d,]*\d)?(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def number_value(text: str) -> Decimal | None:
    """The number ``text`` is ("1,200", "$5", "12." included), or None if it is not just a number."""
    plain = text.strip().replace(",", "").replace("$", "").rstrip(".")
    return Decimal(plain) if _PLAIN_NUMBER.fullmatch(plain) else None


def compile_extract(pattern: str | None, where: str) -> re.Pattern | None:
    """The user's extraction regex compiled, or None for the default rule ("" or None).

    One capture group, so that what is compared is never ambiguous; a bad pattern is one line
    naming ``where`` (the option or key it came from)."""
    if not pattern:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise NrtError(f"{where} {pattern!r}: not a valid regular expression ({err})") from None
    if compiled.groups != 1:
        raise NrtError(
            f"{where} {pattern!r}: needs exactly one capture group (it has {compiled.groups}), "
            "the part to compare, e.g. 'answer is (.+)'; use (?:...) for other groups"
        )
    return compiled


def extract_answer(text: str, reference: str, pattern: re.Pattern | None = None) -> str | None:
    """The answer inside a generated text, or None when there is none.

    ``pattern``: its capture group in the first match (the harness's regex filter by default takes
    the first match). Else, when the reference is a number: the last number in the text (the
    conclusion of a worked answer, as the harness's flexible-extract). Else: the first non-empty
    line (models often explain after the answer)."""
    if pattern is not None:
        match = pattern.search(text)
        found = match.group(1) if match else None
        return found.strip() if found is not None else None
    if number_value(reference) is not None:
        numbers = _NUMBER_IN_TEXT.findall(text)
        return numbers[-1] if numbers else None
    return next((line.strip() for line in text.splitlines() if line.strip()), None)


def answers_equal(extracted: str, reference: str) -> bool:
    """Numbers by value (1,200 = 1200 = 1200.0), other texts by normalised exact match."""
    a, b = number_value(extracted), number_value(reference)
    if a is not None and b is not None:
        return a == b
    return normalize_answer(extracted) == normalize_answer(reference)


def flexible_match(prediction: str, reference: str, pattern: re.Pattern | None = None) -> float:
    """1.0 when the answer extracted from ``prediction`` equals the reference, else 0.0."""
    extracted = extract_answer(prediction, reference, pattern)
    return float(extracted is not None and answers_equal(extracted, reference))
