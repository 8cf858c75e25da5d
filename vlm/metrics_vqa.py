"""VQA-style metrics in the LLaVA evaluation protocol (the rules are written out below).

* ``vqa`` (VQAv2, TextVQA): EvalAI answer normalisation of prediction and of each human answer (the
  official VQA evaluation's steps and contraction table), then the soft accuracy
  mean_{10 leave-one-out subsets} min(1, #matches / 3).
* ``gqa``: exact match after lower-casing and stripping trailing periods.
* ``pope``: yes/no parsing as LLaVA does (text before the first '.', commas removed, any token
  in {No, no, not} -> "no", else "yes"); accuracy, precision, recall, F1 (positive = "yes") and the
  yes-ratio.
* ``mc`` (ScienceQA, MMBench): the option letter (the whole answer, "X. ..." or "The answer is X.")
  compared with the ground-truth letter.

Each metric is a :class:`Scorer` in ``SCORERS``: ``score(prediction, answer) -> per-sample record``
and ``reduce(records) -> {name: percent}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

# The contraction table of the official VQA evaluation (vqaEval.py, also EvalAI's and mmf's): a
# missing entry ("oclock" -> "o'clock") or an extra one ("shed" -> "she'd") changes which answers match.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def normalize_vqa_answer(text: str) -> str:
    """EvalAI's answer processing (steps 1-4 of the VQA evaluation)."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = text.replace(",", "").replace("?", "").replace("'s", " 's").strip()
    # Whether a mark is deleted or spaced is decided on the text before this step, not on the text
    # as the loop rewrites it (the official code reads its input: "(-5) or 1-2" -> "5 or 1 2").
    source = text
    for p in _PUNCT:
        if (p + " " in source or " " + p in source) or _DIGIT_COMMA.search(source) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD.sub("", text)
    words = []
    for w in text.split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """mean over the leave-one-out subsets of min(1, #matches / 3) (one subset per human answer)."""
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    if not gts:
        raise ValueError("VQA accuracy needs the human answers.")
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        scores.append(min(1.0, sum(g == pred for g in others) / 3.0))
    return sum(scores) / len(scores)


def gqa_match(prediction: str, answer: str) -> float:
    return float(prediction.strip().rstrip(".").lower() == answer.strip().rstrip(".").lower())


def pope_yes_no(text: str) -> str:
    """LLaVA's POPE parsing: anything without a negation word before the first '.' is "yes"."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def choice_letter(text: str, letters: str = "ABCDE") -> str:
    """The option letter of an answer: the whole text, an "X. ..." prefix, or "The answer is X."."""
    text = text.strip()
    if text in letters:
        return text
    if len(text) >= 3 and text[0] in letters and text[1:3] == ". ":
        return text[0]
    found = re.findall(rf"The answer is ([{letters}])\.", text)
    return found[0] if len(found) == 1 else "FAILED"


Answer = Union[str, Sequence[str]]


@dataclass(frozen=True)
class Scorer:
    """``score(prediction, answer)`` per sample; ``reduce(records)`` to named percentages."""

    score: Callable[[str, Any], Any]
    reduce: Callable[[list[Any]], dict[str, float]]


def _mean_percent(name: str) -> Callable[[list[float]], dict[str, float]]:
    return lambda rs: {name: 100.0 * sum(rs) / max(len(rs), 1)}


def pope_summary(records: list[tuple[str, str]]) -> dict[str, float]:
    """``records`` of (parsed prediction, label): accuracy, precision, recall, F1, yes-ratio (percent)."""
    tp = sum(p == "yes" and g == "yes" for p, g in records)
    tn = sum(p == "no" and g == "no" for p, g in records)
    fp = sum(p == "yes" and g == "no" for p, g in records)
    fn = sum(p == "no" and g == "yes" for p, g in records)
    n = max(len(records), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "pope_acc": 100.0 * (tp + tn) / n, "pope_precision": 100.0 * precision, "pope_recall": 100.0 * recall,
        "pope_f1": 100.0 * f1, "pope_yes_ratio": 100.0 * (tp + fp) / n,
    }


def _as_list(answer: Answer) -> list[str]:
    return [answer] if isinstance(answer, str) else list(answer)


SCORERS: dict[str, Scorer] = {
    "vqa": Scorer(lambda p, a: vqa_soft_accuracy(p, _as_list(a)), _mean_percent("vqa_acc")),
    "gqa": Scorer(lambda p, a: gqa_match(p, _as_list(a)[0]), _mean_percent("gqa_acc")),
    "pope": Scorer(lambda p, a: (pope_yes_no(p), _as_list(a)[0].strip().lower()), pope_summary),
    "mc": Scorer(lambda p, a: float(choice_letter(p) == _as_list(a)[0].strip()), _mean_percent("mc_acc")),
}


def scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise KeyError(f"Unknown VQA metric {name!r}. Available: {', '.join(sorted(SCORERS))}.")
    return SCORERS[name]
