"""VQA-style evaluation sets in the LLaVA eval format: a question JSONL, an image folder, answers.

Question file: one JSON object per line with ``question_id``, ``image`` (path relative to
``image_folder``, or a list of paths for a question about several images, which the prompt shows
in that order) and ``text`` (the question with its benchmark suffix), optional ``category``.
Answers come from the question line itself (``answers`` list, ``answer`` or POPE's ``label``) or
from ``answers_file``, a JSONL of ``{"question_id", "answers" | "answer" | "label"}`` lines.
Batches are lists (PIL images, or lists of them; strings): the model's own processor builds the
tensors and the backbone the prompt, so the same data serves any LLaVA or Qwen checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import lightning as L
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vlm.datamodules.distributed import exact_eval_sampler
from vlm.datamodules.transforms import strict_decoding, to_rgb
from vlm.metrics_vqa import SCORERS

_ANSWER_KEYS = ("answers", "answer", "label")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _answer(record: dict[str, Any]) -> Any:
    for key in _ANSWER_KEYS:
        if key in record:
            return record[key]
    return None


class VQAQuestions(Dataset):
    """Questions joined with their answers by ``question_id``; ``limit`` keeps the first N."""

    def __init__(self, question_file: str, image_folder: str, answers_file: Optional[str] = None, limit: Optional[int] = None) -> None:
        self.image_folder = Path(image_folder)
        self.questions = read_jsonl(question_file)[:limit]
        extra = {str(r["question_id"]): _answer(r) for r in read_jsonl(answers_file)} if answers_file else {}
        self.answers = []
        for q in self.questions:
            ans = _answer(q) if _answer(q) is not None else extra.get(str(q["question_id"]))
            if ans is None:
                raise ValueError(
                    f"question {q['question_id']!r} has no answer in the question file {question_file} or the answers file "
                    f"{answers_file}. Accepted answer keys, in a question line or in an answers-file line with the same "
                    f"\"question_id\": {', '.join(repr(k) for k in _ANSWER_KEYS)} (a list of answers, one answer, or "
                    "POPE's yes/no label)."
                )
            self.answers.append(ans)

    def __len__(self) -> int:
        return len(self.questions)

    def load(self, path: str) -> Image.Image:
        with Image.open(self.image_folder / path) as im, strict_decoding():
            return to_rgb(im)

    def __getitem__(self, i: int) -> dict[str, Any]:
        q = self.questions[i]
        paths = q["image"]
        image = [self.load(p) for p in paths] if isinstance(paths, list) else self.load(paths)
        return {"question_id": q["question_id"], "image": image, "text": q["text"], "answer": self.answers[i],
                "category": q.get("category", "default")}


def collate_lists(items: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {k: [it[k] for it in items] for k in items[0]}


class VQADataModule(L.LightningDataModule):
    """Args:
    question_file: LLaVA-format question JSONL.
    image_folder: root that ``image`` paths are relative to.
    answers_file: optional JSONL of answers keyed by ``question_id``.
    metric: ``vqa`` (VQAv2/TextVQA), ``gqa``, ``pope`` or ``mc`` (ScienceQA, MMBench).
    dataset: the name written into results.json.
    batch_size, num_workers: loader settings; ``limit``: evaluate the first N questions only.
    """

    def __init__(
        self,
        question_file: str,
        image_folder: str,
        answers_file: Optional[str] = None,
        metric: str = "vqa",
        dataset: str = "vqa",
        batch_size: int = 8,
        num_workers: int = 0,
        limit: Optional[int] = None,
    ) -> None:
        super().__init__()
        if metric not in SCORERS:
            raise ValueError(f"Unknown metric {metric!r}. Available: {', '.join(sorted(SCORERS))}.")
        self.question_file, self.image_folder, self.answers_file = question_file, image_folder, answers_file
        self.metric, self.dataset, self.limit = metric, dataset, limit
        self.batch_size, self.num_workers = batch_size, num_workers
        self.data: Optional[VQAQuestions] = None

    def setup(self, stage: str) -> None:
        self.data = VQAQuestions(self.question_file, self.image_folder, self.answers_file, self.limit)

    def test_dataloader(self) -> DataLoader:
        """In order; under DDP each rank takes an unpadded, interleaved share (``exact_eval_sampler``), so
        every question is answered once and ``LlavaEval`` gathers the records."""
        assert self.data is not None, "call setup() first"
        return DataLoader(self.data, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_lists,
                          sampler=exact_eval_sampler(self.data))

    predict_dataloader = test_dataloader
