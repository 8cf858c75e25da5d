"""One scorer: the in-tree scorers of `vlm test` (vlm/metrics_vqa.py) against lmms-eval's own
processing of the same answers, lmms-eval's task functions called directly (VQAv2, TextVQA, POPE,
GQA's `exact_match` with the flags of its gqa.yaml, ScienceQA-IMG).

Each scorer meets a written list of tricky answers (articles, punctuation, number words,
contractions, capitals, trailing periods, "Yes, there is." sentences) and a small hypothesis
strategy. Where the two agree by design the test asserts equality on every case; where they differ
by design it asserts the exact cases of the list that differ and the rule that makes them differ:

* VQA soft accuracy = lmms-eval's `textvqa` scoring (EvalAI's answer processor on prediction and
  human answers) on every case. lmms-eval's `vqav2` scoring skips EvalAI's first step (lower-case,
  delete ',' and '?', split "'s" off): it differs exactly where that step matters ("red,white").
* POPE: lmms-eval takes the whole answer, lower-cased and stripped, as the label (anything else
  than "yes"/"no" is wrong, and neither positive nor negative in precision and recall); `vlm test`
  parses it as LLaVA's eval_pope does (first sentence, commas dropped, a token No/no/not -> "no",
  else "yes"). lmms-eval's `pope_yes_ratio` is the ratio of "yes" labels, ours of "yes" predictions.
* GQA: lmms-eval deletes every ASCII punctuation mark; `vlm test` (LLaVA's GQA conversion) strips
  trailing periods only: "t-shirt" vs "tshirt" matches in lmms-eval, not in `vlm test`.
* Multiple choice (ScienceQA): lmms-eval also takes a lower-case letter and "X." with no space
  after; `vlm test` (LLaVA's eval_science_qa) also takes "The answer is X.".

Skipped without lmms-eval (`pip install -e ".[eval]"`)."""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lmms_eval")

import lmms_eval.api.metrics  # noqa: E402,F401  (registers exact_match)
import lmms_eval.tasks  # noqa: E402
import yaml  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from lmms_eval.api.registry import METRIC_REGISTRY  # noqa: E402
from lmms_eval.tasks.pope import utils as lmms_pope  # noqa: E402
from lmms_eval.tasks.scienceqa.utils import sqa_process_results  # noqa: E402
from lmms_eval.tasks.textvqa.utils import textvqa_process_results  # noqa: E402
from lmms_eval.tasks.vqav2.utils import vqav2_process_results  # noqa: E402

from vlm.metrics_vqa import SCORERS, pope_yes_no  # noqa: E402

TASKS_DIR = Path(lmms_eval.tasks.__file__).resolve().parent
HYPOTHESIS = settings(max_examples=50, deadline=None, derandomize=True)


def task_yaml(path: str) -> dict[str, Any]:
    """A task YAML of lmms-eval, its `!function` tags read as their dotted names."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load((TASKS_DIR / path).read_text(), Loader=Loader)


def same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=0, abs_tol=1e-12)  # statistics.mean vs sum / n


# --- VQA soft accuracy (VQAv2, TextVQA) ----------------------------------------------------------
def lmms_vqav2(prediction: str, answers: list[str]) -> float:
    doc = {"question_id": 0, "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}
    return vqav2_process_results(doc, [prediction])["exact_match"]


def lmms_textvqa(prediction: str, answers: list[str]) -> float:
    return textvqa_process_results({"question_id": 0, "answers": list(answers)}, [prediction])["exact_match"]


def ours_vqa(prediction: str, answers: list[str]) -> float:
    return SCORERS["vqa"].score(prediction, answers)


def evalai_first_step(text: str) -> str:
    """EvalAI's word tokenisation, the step lmms-eval's vqav2 scoring leaves out."""
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


VQA_CASES: dict[str, tuple[str, list[str]]] = {
    "exact": ("dog", ["dog"] * 10),
    "capitalised": ("Dog", ["dog"] * 10),
    "article a": ("a dog", ["dog"] * 7 + ["the dog"] * 3),
    "article the": ("The dog", ["dog"] * 10),
    "trailing period": ("yes.", ["yes"] * 10),
    "sentence": ("Yes, there is.", ["yes"] * 10),
    "newline": ("yes\n", ["yes"] * 10),
    "number word": ("two", ["2"] * 6 + ["two"] * 2 + ["3"] * 2),
    "digit vs word": ("2", ["two"] * 4 + ["2"] * 4 + ["3"] * 2),
    "none is zero": ("none", ["0"] * 10),
    "partial agreement": ("blue", ["blue"] * 2 + ["navy"] * 8),
    "contraction without apostrophe": ("dont know", ["don't know"] * 10),
    "contraction with apostrophe": ("don't", ["dont"] * 3 + ["no"] * 7),
    "official table: oclock": ("5 oclock", ["5 o'clock"] * 5 + ["5:00"] * 5),
    "official table: no 'shed'": ("she'd", ["shed"] * 10),
    "official table: maam": ("maam", ["ma'am"] * 10),
    "possessive": ("man's", ["man's"] * 10),
    "possessive vs plural": ("mans", ["man's"] * 10),
    "upper-case possessive": ("DOG'S", ["dog's"] * 10),
    "thousands comma": ("1,000", ["1000"] * 10),
    "comma and space": ("red, white", ["red white"] * 10),
    "comma between words": ("red,white", ["red white"] * 10),
    "question mark inside": ("yes?no", ["yes no"] * 10),
    "question mark at the end": ("what?", ["what"] * 10),
    "hyphen": ("t-shirt", ["t shirt"] * 6 + ["tshirt"] * 4),
    "spaced hyphen": ("t - shirt", ["tshirt"] * 10),
    "marks decided on the input": ("(-5) or 1-2", ["5 or 1 2"] * 10),
    "decimal point": ("3.5", ["3.5"] * 10),
    "abbreviation periods": ("a.m.", ["am"] * 10),
    "slash": ("black/white", ["black white"] * 10),
}
# Where lmms-eval's vqav2 scoring differs: EvalAI's first step (',' '?' deleted, "'s" split) decides.
VQAV2_DIFFERS = {"comma between words", "question mark inside"}

_APOSTROPHES = ["don't", "o'clock", "ma'am", "man's", "it's", "she'd", "we'd", "let's", "'twas", "y'all'll"]
_WORDS = ["a", "the", "two", "2", "Yes", "no", "t-shirt", "1,000", "3.5", "(-5)", "1-2", "(", ")", "-", "?", "!", ".",
          ",", "/", *_APOSTROPHES]  # fmt: skip
_SEPARATORS = [" ", "", ", ", ",", ". ", "-"]
vqa_text = st.one_of(
    st.sampled_from(_APOSTROPHES),
    st.lists(st.tuples(st.sampled_from(_WORDS), st.sampled_from(_SEPARATORS)), min_size=1, max_size=4).map(
        lambda ws: "".join(w + s for w, s in ws)
    ),
    st.text(alphabet="aAbeyst2 .,?!'-/()", max_size=12),
)
_VARIANTS = [str.upper, str.title, lambda t: t.replace("'", ""), lambda t: t.replace("-", " "), lambda t: t.replace(" ", ""),
             lambda t: "the " + t, lambda t: t + ".", lambda t: t.replace(" ", "-")]  # fmt: skip


@st.composite
def vqa_case(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A prediction and ten human answers: up to four drawn from the prediction, variants of it (no
    apostrophes; case, hyphens, spaces, articles, periods) and other texts, then a filler (few matches, so
    that a normalisation difference changes the score rather than saturating at min(1, n / 3))."""
    prediction = draw(vqa_text)
    variants = [f(prediction) for f in draw(st.lists(st.sampled_from(_VARIANTS), min_size=1, max_size=3))]
    pool = [prediction, prediction.replace("'", ""), *variants, *draw(st.lists(vqa_text, max_size=2))]
    answers = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4))
    return prediction, answers + ["something else"] * (10 - len(answers))


def test_vqa_written_cases() -> None:
    for name, (prediction, answers) in VQA_CASES.items():
        ours = ours_vqa(prediction, answers)
        assert same(ours, lmms_textvqa(prediction, answers)), name
        assert same(ours, lmms_vqav2(evalai_first_step(prediction), [evalai_first_step(a) for a in answers])), name
    differs = {n for n, (p, a) in VQA_CASES.items() if not same(ours_vqa(p, a), lmms_vqav2(p, a))}
    assert differs == VQAV2_DIFFERS
    # the fixes of vlm/metrics_vqa.py (the official VQA evaluation's table and its punctuation rule)
    assert ours_vqa(*VQA_CASES["official table: oclock"]) == 1.0
    assert ours_vqa(*VQA_CASES["official table: no 'shed'"]) == 0.0
    assert ours_vqa(*VQA_CASES["marks decided on the input"]) == 1.0


@HYPOTHESIS
@given(vqa_case())
def test_vqa_equals_lmms_eval_textvqa_and_vqav2_up_to_the_first_step(case: tuple[str, list[str]]) -> None:
    prediction, answers = case
    ours = ours_vqa(prediction, answers)
    assert same(ours, lmms_textvqa(prediction, answers))
    assert same(ours, lmms_vqav2(evalai_first_step(prediction), [evalai_first_step(a) for a in answers]))
    if not any(c in t for t in [prediction, *answers] for c in (",", "?", "'s", "'S")):
        assert same(ours, lmms_vqav2(prediction, answers))


# --- POPE ------------------------------------------------------------------------------------------
POPE_ANSWERS = ["yes", "no", "Yes", "No", "YES", "NO", " yes ", "yes.", "No.", "Yes, there is.", "No, there is not.",
                "Yes, there is a dog in the image.", "There is a dog.", "There is no dog.", "I do not see a dog.",
                "Nope.", "no\n", "Yes. No."]  # fmt: skip
# Where the per-sample scores differ: (answer, label). lmms-eval scores every sentence 0; `vlm test`
# parses it. "NO" and "no\n" are "yes" for LLaVA's parser (its tokens are case- and space-exact).
POPE_DIFFERS = {
    ("yes.", "yes"), ("No.", "no"), ("Yes, there is.", "yes"), ("No, there is not.", "no"),
    ("Yes, there is a dog in the image.", "yes"), ("There is a dog.", "yes"), ("There is no dog.", "no"),
    ("I do not see a dog.", "no"), ("Nope.", "yes"), ("NO", "yes"), ("NO", "no"), ("no\n", "yes"), ("no\n", "no"),
    ("Yes. No.", "yes"),
}  # fmt: skip
POPE_SAME_LABEL = {"yes", "Yes", "no", "No"}  # with spaces around: both scorers read the same label


def lmms_pope_records(cases: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [lmms_pope.pope_process_results({"question_id": i, "answer": gt}, [a]) for i, (a, gt) in enumerate(cases)]


def lmms_pope_aggregate(cases: list[tuple[str, str]]) -> dict[str, float]:
    """lmms-eval's POPE metrics, each aggregated by the function pope.yaml names for it."""
    records = lmms_pope_records(cases)
    out = {}
    for m in task_yaml("pope/pope.yaml")["metric_list"]:
        aggregate = getattr(lmms_pope, m["aggregation"].rsplit(".", 1)[-1])
        out[m["metric"]] = 100.0 * aggregate([r[m["metric"]] for r in records])
    return out


def ours_pope_summary(cases: list[tuple[str, str]]) -> dict[str, float]:
    s = SCORERS["pope"]
    return s.reduce([s.score(a, gt) for a, gt in cases])


def ours_pope_score(answer: str, label: str) -> float:
    parsed, gt = SCORERS["pope"].score(answer, label)
    return float(parsed == gt)


def test_pope_written_cases() -> None:
    cases = [(a, gt) for a in POPE_ANSWERS for gt in ("yes", "no")]
    lmms = [r["pope_accuracy"]["score"] for r in lmms_pope_records(cases)]
    differs = {c for c, score in zip(cases, lmms) if score != ours_pope_score(*c)}
    assert differs == POPE_DIFFERS
    for (answer, gt), score in zip(cases, lmms):  # the rule: lmms-eval's label is the whole answer
        assert score == float(answer.lower().strip() == gt)
        assert ours_pope_score(answer, gt) == float(pope_yes_no(answer) == gt)

    # Summaries: equal on answers both read alike, but for the yes-ratio (labels vs predictions).
    alike = [(a, gt) for a, gt in cases if a.strip(" ") in POPE_SAME_LABEL] + [("yes", "yes"), ("no", "yes"), ("yes", "no")]
    lmms, ours = lmms_pope_aggregate(alike), ours_pope_summary(alike)
    for lmms_key, key in [("pope_accuracy", "pope_acc"), ("pope_precision", "pope_precision"),
                          ("pope_recall", "pope_recall"), ("pope_f1_score", "pope_f1")]:  # fmt: skip
        assert same(lmms[lmms_key], ours[key]), key
    assert same(lmms["pope_yes_ratio"], 100.0 * sum(gt == "yes" for _, gt in alike) / len(alike))
    assert same(ours["pope_yes_ratio"], 100.0 * sum(pope_yes_no(a) == "yes" for a, _ in alike) / len(alike))
    assert lmms["pope_yes_ratio"] != ours["pope_yes_ratio"]


_POPE_WORD = st.sampled_from(["yes", "Yes", "YES", "no", "No", "NO", "not", "nope"])
_POPE_TAIL = st.sampled_from(["", " ", ".", ",", ", there is.", ", there is not.", "\n", ". No."])
pope_answer = st.one_of(
    st.builds(lambda pre, word, post: pre + word + post, st.sampled_from(["", " ", "  "]), _POPE_WORD, _POPE_TAIL),
    st.text(alphabet="yesnoYNt .,", max_size=12),
)


@HYPOTHESIS
@given(st.lists(st.tuples(pope_answer, st.sampled_from(["yes", "no"])), min_size=1, max_size=8))
def test_pope_differs_only_by_the_label_rule(cases: list[tuple[str, str]]) -> None:
    for (answer, gt), record in zip(cases, lmms_pope_records(cases)):
        lmms, ours = record["pope_accuracy"]["score"], ours_pope_score(answer, gt)
        if answer.strip(" ") in POPE_SAME_LABEL:
            assert lmms == ours
        elif answer.lower().strip() not in ("yes", "no"):
            assert lmms == 0.0  # any other text is wrong for lmms-eval; `vlm test` parses it
        if lmms != ours:
            assert answer.lower().strip() != pope_yes_no(answer)
    same_label = [(a, gt) for a, gt in cases if a.strip(" ") in POPE_SAME_LABEL]
    if same_label:
        lmms, ours = lmms_pope_aggregate(same_label), ours_pope_summary(same_label)
        assert same(lmms["pope_accuracy"], ours["pope_acc"]) and same(lmms["pope_f1_score"], ours["pope_f1"])


# --- GQA ---------------------------------------------------------------------------------------------
def lmms_gqa(prediction: str, answer: str) -> float:
    """GQA's `exact_match` with the flags of lmms-eval's gqa.yaml, on the stripped answer (as lmms-eval's
    generate_until scoring passes it)."""
    (config,) = [m for m in task_yaml("gqa/gqa.yaml")["metric_list"] if m["metric"] == "exact_match"]
    kwargs = {k: v for k, v in config.items() if k not in ("metric", "aggregation", "higher_is_better")}
    assert kwargs == {"ignore_case": True, "ignore_punctuation": True}
    return float(METRIC_REGISTRY["exact_match"](references=[answer], predictions=[prediction.strip()], **kwargs)["exact_match"])


def ours_gqa(prediction: str, answer: str) -> float:
    return SCORERS["gqa"].score(prediction, answer)


GQA_CASES = [("yes", "yes"), ("Yes", "yes"), ("YES", "yes"), ("yes.", "yes"), ("yes..", "yes"), (" yes ", "yes"),
             ("Yes, there is.", "yes"), ("no", "yes"), ("left.", "left"), ("Left!", "left"), ("t-shirt", "t-shirt"),
             ("t-shirt", "tshirt"), ("T-Shirt.", "t-shirt"), ("tshirt", "t-shirt"), ("t shirt", "t-shirt"),
             ("it's", "its"), ("a.m.", "am"), ("the dog", "dog"), ("two", "2"), ("2", "2"), ("dogs.", "dogs")]  # fmt: skip
# lmms-eval deletes every punctuation mark; `vlm test` trailing periods only.
GQA_DIFFERS = {("Left!", "left"), ("t-shirt", "tshirt"), ("tshirt", "t-shirt"), ("it's", "its"), ("a.m.", "am")}


def test_gqa_written_cases() -> None:
    differs = {c for c in GQA_CASES if ours_gqa(*c) != lmms_gqa(*c)}
    assert differs == GQA_DIFFERS
    assert all(ours_gqa(*c) == 0.0 and lmms_gqa(*c) == 1.0 for c in differs)


_GQA_WORDS = ["yes", "Yes", "no", "left", "t-shirt", "tshirt", "it's", "its", "a.m.", "am", "red"]
gqa_answer = st.one_of(st.sampled_from(_GQA_WORDS), st.text(alphabet="abAB .,!'-", max_size=8))
gqa_pred = st.builds(lambda pre, a, post: pre + a + post, st.sampled_from(["", " "]), gqa_answer,
                     st.sampled_from(["", ".", "..", " ", "!", ". "]))  # fmt: skip


@HYPOTHESIS
@given(gqa_pred, gqa_answer.map(str.strip))
def test_gqa_differs_only_by_inner_punctuation(prediction: str, answer: str) -> None:
    ours, lmms = ours_gqa(prediction, answer), lmms_gqa(prediction, answer)
    assert ours <= lmms  # lmms-eval is the more lenient: a `vlm test` match is an lmms-eval match
    inner = prediction.strip().rstrip(".") + answer.rstrip(".")
    if not any(c in string.punctuation for c in inner):
        assert ours == lmms


# --- multiple choice (ScienceQA-IMG) --------------------------------------------------------------
CHOICES = ["cat", "dog", "bird"]


def lmms_sqa(prediction: str, letter: str) -> float:
    return sqa_process_results({"choices": CHOICES, "answer": "ABC".index(letter)}, [prediction])["exact_match"]


def ours_mc(prediction: str, letter: str) -> float:
    return SCORERS["mc"].score(prediction, letter)


MC_CASES = [("A", "A"), ("B", "A"), ("a", "A"), ("A.", "A"), ("A. cat", "A"), ("A.cat", "A"), ("B. dog", "A"),
            ("The answer is A.", "A"), ("The answer is B.", "A"), ("(A)", "A"), ("A)", "A"), (" A ", "A"),
            ("Answer: A", "A"), ("C", "C"), ("c. bird", "C"), ("D", "A"), ("AB", "A"), ("", "A"),
            ("A. cat. The answer is A.", "A")]  # fmt: skip
# lmms-eval: also a lower-case letter and "X." with no space; `vlm test`: also "The answer is X.".
MC_DIFFERS = {("a", "A"), ("A.", "A"), ("A.cat", "A"), ("The answer is A.", "A")}


def test_multiple_choice_written_cases() -> None:
    differs = {c for c in MC_CASES if ours_mc(*c) != lmms_sqa(*c)}
    assert differs == MC_DIFFERS


_MC_HEAD = st.sampled_from(["", " ", "The answer is ", "("])
_MC_TAIL = st.sampled_from(["", ".", ". cat", ".cat", ")", " ", ". The answer is A."])
mc_answer = st.one_of(
    st.builds(lambda pre, letter, post: pre + letter + post, _MC_HEAD, st.sampled_from("ABCDab"), _MC_TAIL),
    st.text(alphabet="ABab .()", max_size=6),
)


@HYPOTHESIS
@given(mc_answer, st.sampled_from("ABC"))
def test_multiple_choice_differs_only_by_the_letter_rule(prediction: str, letter: str) -> None:
    ours, lmms = ours_mc(prediction, letter), lmms_sqa(prediction, letter)
    s = prediction.strip()
    if s in "ABCDE" and len(s) == 1 or (s[:1] in "ABCDE" and s[1:3] == ". "):
        assert ours == lmms
    if ours != lmms:
        assert s == letter.lower() or (s[:1].isupper() and s[1:2] == "." and s[2:3] != " ") or "The answer is" in s
