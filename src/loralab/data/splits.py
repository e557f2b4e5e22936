"""Label maps, seeded stratified splits and the train/test leak check."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from loralab.data.tables import Table
from loralab.errors import LoralabError


@dataclass
class LabelMap:
    labels: list[str]  # id -> label string

    @classmethod
    def from_labels(cls, labels: list[str]) -> LabelMap:
        unique = set(labels)
        if all(_is_int(x) for x in unique):
            ordered = sorted(unique, key=int)  # 0/1 stay 0/1
        else:
            ordered = sorted(unique)
        return cls(ordered)

    @property
    def label2id(self) -> dict[str, int]:
        return {lab: i for i, lab in enumerate(self.labels)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    def encode(self, labels: list[str]) -> list[int]:
        ids = self.label2id
        return [ids[x] for x in labels]

    def to_json(self) -> dict:
        return {"labels": self.labels, "label2id": self.label2id,
                "id2label": {str(i): lab for i, lab in enumerate(self.labels)}}

    @classmethod
    def from_json(cls, data: dict) -> LabelMap:
        return cls(list(data["labels"]))


def _is_int(s: str) -> bool:
    return bool(re.fullmatch(r"-?\d+", s))


def stratified_split(n_labels: list[str], fractions: tuple[float, ...], seed: int):
    """Split row indexes per class so every part keeps the class balance.

    Returns one sorted index list per fraction plus the remainder (first part).
    Each class keeps at least one row in the first (training) part.
    """
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i, lab in enumerate(n_labels):
        by_class.setdefault(lab, []).append(i)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for lab in sorted(by_class):
        idx = by_class[lab]
        rng.shuffle(idx)
        start = 0
        for k, frac in enumerate(fractions, start=1):
            take = min(round(len(idx) * frac), max(0, len(idx) - start - 1))
            parts[k].extend(idx[start:start + take])
            start += take
        parts[0].extend(idx[start:])
    return [sorted(p) for p in parts]


def subset(table: Table, idx: list[int]) -> Table:
    return Table([table.texts[i] for i in idx], [table.labels[i] for i in idx], table.source)


def split_table(train: Table, eval_t: Table | None, test_t: Table | None,
                eval_split: float, test_split: float, seed: int):
    """80/10/10 by default; only the missing parts are carved out of ``train``."""
    want = []
    if eval_t is None and eval_split > 0:
        want.append(("eval", eval_split))
    if test_t is None and test_split > 0:
        want.append(("test", test_split))
    if not want:
        return train, eval_t, test_t
    parts = stratified_split(train.labels, tuple(f for _, f in want), seed)
    carved = {name: subset(train, parts[k + 1]) for k, (name, _) in enumerate(want)}
    return (subset(train, parts[0]), eval_t or carved.get("eval"),
            test_t or carved.get("test"))


def check_labels(label_map: LabelMap, other: Table | None, role: str) -> None:
    """A label seen only in eval/test data cannot be learned: refuse it."""
    if other is None:
        return
    known = set(label_map.labels)
    unseen = sorted(set(other.labels) - known)
    if unseen:
        rows = [i + 1 for i, lab in enumerate(other.labels) if lab == unseen[0]][:3]
        raise LoralabError(
            f"label {unseen[0]!r} appears only in the {role} data ({other.source}, rows "
            f"{', '.join(map(str, rows))}). Add training examples of it or remove those rows.")


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def count_overlap(train: Table, other: Table | None) -> tuple[int, int]:
    """(rows of ``other`` whose text also appears in ``train``, rows of ``other``)."""
    if other is None:
        return 0, 0
    return count_text_overlap(train.texts, other.texts)


def count_text_overlap(train: list[str], other: list[str] | None) -> tuple[int, int]:
    """(texts of ``other`` also in ``train``, up to case and spacing; texts of ``other``)."""
    if not other:
        return 0, 0
    seen = {_norm(t) for t in train}
    return sum(_norm(t) in seen for t in other), len(other)


def conversation_text(conv: list[dict]) -> str:
    """One string per sft record, every turn's role and content: two records
    are duplicates when all their turns are."""
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in conv)
