"""From a config to train/eval/test splits, in two stages.

``prepare_data`` reads and checks the files (no model, no tokenizer), so bad
input is reported before anything is loaded or written. ``encode_splits``
tokenizes each split once for the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from loralab.data.documents import read_documents
from loralab.data.encode import (
    Encoded,
    encode_classification,
    encode_conversations,
    encode_documents,
)
from loralab.data.instructions import read_sft, split_conversations
from loralab.data.splits import (
    LabelMap,
    check_labels,
    conversation_text,
    count_overlap,
    count_text_overlap,
    split_table,
)
from loralab.data.tables import Table, read_table
from loralab.errors import LoralabError

BUILTIN_FILES = {"tickets": "tickets.csv", "instructions": "instructions.jsonl",
                 "general_text": "general_text.txt"}


def builtin_path(name: str) -> Path:
    return Path(str(resources.files("loralab.data") / "builtin" / BUILTIN_FILES[name]))


def resolve_data_path(data: str) -> str:
    """A built-in data set name (``tickets``, ``instructions``) or a file path."""
    if data in BUILTIN_FILES:
        path = builtin_path(data)
        if not path.is_file():
            raise LoralabError(f"built-in data set {data!r} is missing from this installation "
                               f"({path}). Reinstall loralab or pass --data FILE.")
        return str(path)
    return data


@dataclass
class Prepared:
    """Raw splits: Tables (classify), conversation lists (sft) or documents (lm)."""
    task: str
    train: object
    eval: object | None
    test: object | None
    label_map: LabelMap | None = None
    warnings: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was read, and how (logged)
    truncation: str = "left"


def prepare_data(cfg) -> Prepared:
    if cfg.task == "classify":
        return _prepare_classify(cfg)
    if cfg.task == "lm":
        return _prepare_lm(cfg)
    return _prepare_sft(cfg)


def _read(cfg, path: str | None) -> Table | None:
    if path is None:
        return None
    return read_table(resolve_data_path(path), cfg.text_column, cfg.label_column,
                      cfg.data_split, cfg.data_config)


def _prepare_classify(cfg) -> Prepared:
    train = _read(cfg, cfg.data)
    eval_t, test_t = _read(cfg, cfg.eval_data), _read(cfg, cfg.test_data)
    train, eval_t, test_t = split_table(train, eval_t, test_t, cfg.eval_split,
                                        cfg.test_split, cfg.seed)
    label_map = LabelMap.from_labels(train.labels)
    if len(label_map.labels) < 2:
        raise LoralabError(f"the training data has one label ({label_map.labels[0]!r}); "
                           "classification needs 2 or more. Check --label-column.")
    check_labels(label_map, eval_t, "eval")
    check_labels(label_map, test_t, "test")
    prep = Prepared("classify", train, eval_t, test_t, label_map)
    dup, n = count_overlap(train, test_t)
    _warn_overlap(prep, dup, n, "texts")
    prep.info = {"train_rows": len(train.texts), "eval_rows": len(eval_t.texts) if eval_t else 0,
                 "test_rows": len(test_t.texts) if test_t else 0, "test_overlap": dup,
                 "skipped_rows": train.skipped}
    return prep


def _warn_overlap(prep: Prepared, dup: int, n: int, what: str) -> None:
    if dup:
        prep.warnings.append(
            f"{dup} of {n} test {what} also appear in the training data: test scores measure "
            "memorisation, not generalisation. Deduplicate the data before splitting.")


def _prepare_sft(cfg) -> Prepared:
    train, mapping, skipped = read_sft(resolve_data_path(cfg.data), cfg)
    total = len(train) + skipped
    eval_c = read_sft(resolve_data_path(cfg.eval_data), cfg)[0] if cfg.eval_data else None
    test_c = read_sft(resolve_data_path(cfg.test_data), cfg)[0] if cfg.test_data else None
    train, ev, te = split_conversations(train, cfg.eval_split, cfg.test_split, cfg.seed,
                                        eval_c is not None, test_c is not None)
    prep = Prepared("sft", train, eval_c or ev, test_c or te, truncation=cfg.truncation)
    prep.info = {"train_rows": len(train), "eval_rows": len(prep.eval or []),
                 "test_rows": len(prep.test or []), "fields": mapping.describe()}
    dup, n = count_text_overlap([conversation_text(c) for c in train],
                                [conversation_text(c) for c in prep.test or []])
    prep.info["test_overlap"] = dup
    _warn_overlap(prep, dup, n, "records")
    prep.notes.append(f"sft data {cfg.data}: {mapping.describe()}.")
    prep.info["skipped_rows"] = skipped
    if skipped:
        prep.warnings.append(f"{skipped} of {total} records of {cfg.data} have "
                             "no response (empty, or the last turn is not the assistant's): "
                             "skipped.")
    return prep


def _prepare_lm(cfg) -> Prepared:
    train = read_documents(resolve_data_path(cfg.data), cfg)
    eval_d = read_documents(resolve_data_path(cfg.eval_data), cfg) if cfg.eval_data else None
    test_d = read_documents(resolve_data_path(cfg.test_data), cfg) if cfg.test_data else None
    train, ev, te = split_conversations(train, cfg.eval_split, cfg.test_split, cfg.seed,
                                        eval_d is not None, test_d is not None, what="documents")
    prep = Prepared("lm", train, eval_d or ev, test_d or te)
    prep.info = {"train_rows": len(train), "eval_rows": len(prep.eval or []),
                 "test_rows": len(prep.test or [])}
    prep.info["test_overlap"], n = count_text_overlap(train, prep.test)
    _warn_overlap(prep, prep.info["test_overlap"], n, "documents")
    prep.notes.append(f"lm data {cfg.data}: {len(train)} training documents, packed into "
                      f"blocks of max_length tokens with EOS between documents.")
    return prep


@dataclass
class EncodedSplits:
    train: Encoded
    eval: Encoded | None
    test: Encoded | None

    @property
    def truncated(self) -> int:
        return sum(e.truncated for e in (self.train, self.eval, self.test) if e is not None)

    @property
    def dropped(self) -> int:
        return sum(e.dropped for e in (self.train, self.eval, self.test) if e is not None)

    @property
    def prompt_cut(self) -> int:
        return sum(e.prompt_cut for e in (self.train, self.eval, self.test) if e is not None)


def encode_split(prep: Prepared, part, tokenizer, max_length: int) -> Encoded | None:
    if part is None:
        return None
    if prep.task == "classify":
        return encode_classification(tokenizer, part.texts, prep.label_map.encode(part.labels),
                                     max_length)
    if prep.task == "lm":
        return encode_documents(tokenizer, part, max_length)
    return encode_conversations(tokenizer, part, max_length, prep.truncation)


def encode_splits(prep: Prepared, tokenizer, max_length: int) -> EncodedSplits:
    out = EncodedSplits(*(encode_split(prep, p, tokenizer, max_length)
                          for p in (prep.train, prep.eval, prep.test)))
    if len(out.train) == 0:
        raise LoralabError(f"no training example is left after truncation to {max_length} "
                           "tokens. Raise --max-length.")
    return out
