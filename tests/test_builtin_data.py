"""Built-in datasets: loaded from the installed package, checked for size, balance and duplicates."""

import csv
import io
import json
import re
import zlib
from collections import Counter, defaultdict
from importlib.resources import files

import pytest

CLASSES = {"billing", "technical", "account", "shipping", "feedback"}


def _read(name: str) -> str:
    return (files("loralab.data") / "builtin" / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tickets() -> list[dict]:
    reader = csv.DictReader(io.StringIO(_read("tickets.csv"), newline=""))
    assert reader.fieldnames == ["text", "label"]
    return list(reader)


@pytest.fixture(scope="module")
def instructions() -> list[dict]:
    lines = _read("instructions.jsonl").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _shingles(text: str, n: int = 5) -> set[int]:
    """Hashed word n-grams; a text shorter than n words is one shingle."""
    w = _words(text)
    grams = [" ".join(w[i:i + n]) for i in range(max(1, len(w) - n + 1))]
    return {zlib.crc32(g.encode()) for g in grams}


def near_duplicates(texts: list[str], threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """Pairs whose word-5-gram Jaccard similarity is >= threshold.

    An inverted index from shingle to texts means only pairs sharing at least one
    shingle are ever compared, so this is near-linear instead of all pairs.
    """
    sets = [_shingles(t) for t in texts]
    index: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        for h in s:
            index[h].append(i)
    shared: Counter = Counter()
    for ids in index.values():
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                shared[ids[a], ids[b]] += 1
    pairs = []
    for (a, b), inter in shared.items():
        jac = inter / (len(sets[a]) + len(sets[b]) - inter)
        if jac >= threshold:
            pairs.append((a, b, jac))
    return pairs


def test_near_duplicate_detector_finds_a_reworded_copy():
    base = "the parcel arrived late and the box was crushed so the lamp inside is broken"
    texts = [base, base.replace("late", "very late"), "please add a dark mode to the app"]
    assert [(a, b) for a, b, _ in near_duplicates(texts)] == [(0, 1)]


def test_tickets_size_and_class_balance(tickets):
    assert len(tickets) >= 850
    counts = Counter(r["label"] for r in tickets)
    assert set(counts) == CLASSES
    for label, n in counts.items():
        assert 140 <= n <= 220, (label, n)


def test_tickets_texts_unique_after_normalisation(tickets):
    norm = [" ".join(r["text"].lower().split()) for r in tickets]
    assert all(norm)
    dupes = [t for t, n in Counter(norm).items() if n > 1]
    assert not dupes


def test_tickets_have_no_near_duplicates(tickets):
    pairs = near_duplicates([r["text"] for r in tickets])
    shown = [(tickets[a]["text"], tickets[b]["text"], round(j, 2)) for a, b, j in pairs[:3]]
    assert not pairs, shown


def test_tickets_lengths_are_varied(tickets):
    lengths = sorted(len(r["text"].split()) for r in tickets)
    assert lengths[0] >= 4 and lengths[0] <= 6
    assert lengths[-1] >= 50
    assert sum(n <= 8 for n in lengths) >= 40  # terse messages
    assert sum(n >= 30 for n in lengths) >= 20  # rambling messages


def test_instructions_are_valid_and_unique(instructions):
    assert len(instructions) >= 320
    keys = set()
    for rec in instructions:
        assert set(rec) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in rec.values())
        assert rec["instruction"].strip() and rec["output"].strip()
        keys.add((" ".join(rec["instruction"].lower().split()),
                  " ".join(rec["input"].lower().split())))
    assert len(keys) == len(instructions)
    with_input = sum(bool(r["input"].strip()) for r in instructions)
    assert 0.2 * len(instructions) <= with_input <= 0.8 * len(instructions)


def test_general_text_is_3000_to_4000_words_of_paragraphs():
    text = _read("general_text.txt")
    assert 3000 <= len(text.split()) <= 4000
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    assert len(paragraphs) >= 20
    assert len(set(paragraphs)) == len(paragraphs)
    assert all("\n" not in p for p in paragraphs)  # one paragraph per block


def test_readme_states_the_real_counts(tickets, instructions):
    readme = _read("README.md")
    for name in ("tickets.csv", "instructions.jsonl", "general_text.txt"):
        assert name in readme
    assert f"{len(tickets)} customer-support messages" in readme
    assert f"{len(instructions)} records" in readme
    for label, n in Counter(r["label"] for r in tickets).items():
        assert f"`{label}` ({n})" in readme
    words = len(_read("general_text.txt").split())
    assert f"{words:,} words" in readme
