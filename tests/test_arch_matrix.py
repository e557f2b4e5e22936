"""The architecture matrix: every command on a tiny random model of every
popular architecture (tests/tiny_models.py ARCHS, real tokenizers).

One test per architecture runs its row: ``train`` (full, lora, qlora, head) x
(classify, sft, lm where the task exists and applies), ``eval``, ``merge``,
``generate``, ``serve`` (in-process, the app ``loralab serve`` builds),
``estimate`` and ``targets``. Every cell is recorded, and a failing row names
all of its failing cells with their one-line errors. With
``LORALAB_WRITE_MATRIX=1`` the results go to docs/arch_matrix.json and the
table in docs/architectures.md is rebuilt from them (``write_matrix``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from conftest import cli
from tiny_models import ARCHS, arch_config, save_arch
from train_support import class_rows, sft_records, write_csv, write_jsonl

from loralab.config import TASKS

pytestmark = pytest.mark.usefixtures("single_thread")

DOCS = Path(__file__).resolve().parent.parent / "docs"
METHODS = {"classify": ("full", "lora", "qlora", "head"), "sft": ("full", "lora", "qlora"),
           "lm": ("full", "lora", "qlora")}
LABELS = ("billing", "shipping", "tech")
# Cells known to fail, with why; the test fails when one starts passing, so the
# list (and the table) stays true. estimate counts activations with one layer
# program per family (estimate/layers.py), every architecture here included.
KNOWN_GAPS: dict[tuple[str, str], str] = {}


def columns() -> list[str]:
    """Every cell of a row, in table order (lm once the task exists)."""
    cols = [f"train {task} {m}" for task in ("classify", "sft", "lm") if task in TASKS
            for m in METHODS[task]]
    return cols + ["eval", "merge", "generate", "serve", "estimate", "targets"]


def applies(arch: str, col: str) -> bool:
    """Encoders do not generate text: no sft, lm or generate."""
    encoder = ARCHS[arch][2] == "encoder"
    return not (encoder and (col.startswith(("train sft", "train lm")) or col == "generate"))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix")


@pytest.fixture(scope="module")
def data(root):
    d = root / "data"
    d.mkdir()
    docs = [" ".join(t for t, _ in class_rows(6, seed=s)) for s in (2, 3, 4)]
    (d / "text.txt").write_text("\n\n".join(docs))  # three documents, ~150 tokens
    return {"classify": (write_csv(d / "c.csv", class_rows(24)),
                         write_csv(d / "c_eval.csv", class_rows(9, seed=1))),
            "sft": (write_jsonl(d / "s.jsonl", sft_records(16)),
                    write_jsonl(d / "s_eval.jsonl", sft_records(4, seed=1))),
            "lm": (d / "text.txt", d / "text.txt")}


@pytest.fixture(scope="module")
def matrix():
    """Results of every row, written out at the end with LORALAB_WRITE_MATRIX=1."""
    rows: dict[str, dict[str, str]] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    yield rows
    if os.environ.get("LORALAB_WRITE_MATRIX") == "1" and len(rows) == len(ARCHS):
        write_matrix(rows, columns(), (time.perf_counter() - wall, time.process_time() - cpu),
                     DOCS)


class Row:
    """One architecture's cells: each runs, and records 'ok' or its error line."""

    def __init__(self, arch: str, capsys):
        self.arch, self.capsys, self.cells = arch, capsys, {}

    def run(self, col: str, fn) -> bool:
        self.capsys.readouterr()
        start = time.perf_counter()
        try:
            result = fn()
            error = None if result in (None, 0, True) else f"exit {result}"
        except Exception as err:  # noqa: BLE001 - the cell records what failed
            error = f"{type(err).__name__}: {err}"
        if os.environ.get("LORALAB_MATRIX_TIMES"):
            print(f"{self.arch:12} {col:22} {time.perf_counter() - start:6.2f} s", file=sys.__stderr__)
        if error:
            lines = [x for x in self.capsys.readouterr().err.splitlines() if x.startswith("error")]
            self.cells[col] = (lines[-1] if lines else error)[:300]
            return False
        self.cells[col] = "ok"
        return True


def train(model, data, out: Path, task: str, method: str, *extra) -> int:
    path, eval_path = data[task]
    return cli("train", "--model", model, "--data", path, "--eval-data", eval_path,
               "--test-data", eval_path, "--task", task, "--method", method, "--output", out,
               "--max-steps", 1, "--batch-size", 4, "--max-length", 96, "--rank", 2,
               "--quiet", *extra)


def serve_row(model: Path, adapters: dict[str, Path]) -> bool:
    """Classify and complete through the HTTP app ``loralab serve`` builds."""
    from fastapi.testclient import TestClient

    from loralab.serve.app import create_app
    from loralab.serve.server import LoraServer, ServeConfig

    server = LoraServer(ServeConfig(model=str(model), adapters={k: str(v) for k, v in
                                                                adapters.items()}, threads=1))
    with TestClient(create_app(server)) as client:
        if "clf" in adapters:
            r = client.post("/v1/classify", json={"model": "clf", "input": ["refund my card"]})
            assert r.status_code == 200, r.text
            assert r.json()["data"][0]["label"] in LABELS
        if "gen" in adapters:
            r = client.post("/v1/completions", json={"model": "gen", "prompt": "hello",
                                                     "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200, r.text
    return True


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_command(arch, root, data, matrix, capsys):
    model = save_arch(root / "models", arch)
    runs = root / "runs" / arch
    row = Row(arch, capsys)
    for col in columns():
        if col.startswith("train") and applies(arch, col):
            _, task, method = col.split()
            row.run(col, lambda t=task, m=method: train(model, data, runs / f"{t}-{m}", t, m))
    decoder = ARCHS[arch][2] == "decoder"
    clf, gen = runs / "classify-lora", runs / ("sft-lora" if decoder else "none")
    adapters = {k: v for k, v in (("clf", clf), ("gen", gen)) if (v / "adapter").is_dir()}
    row.run("eval", lambda: bool(adapters) and all(
        cli("eval", "--model", model, "--adapter", a, "--data", data[t][1], "--json") == 0
        for t, a in (("classify", clf), ("sft", gen), ("lm", runs / "lm-lora"))
        if (a / "adapter").is_dir()))
    row.run("merge", lambda: bool(adapters) and all(
        cli("merge", "--adapter", a, "--output", runs / f"merged-{k}") == 0
        and (runs / f"merged-{k}" / "config.json").is_file() for k, a in adapters.items()))
    if decoder:
        row.run("generate", lambda: cli("generate", "--model", model, "--adapter", gen,
                                        "--prompt", "hello", "--max-tokens", 3))
    row.run("serve", lambda: bool(adapters) and serve_row(model, adapters))
    row.run("estimate", lambda: cli("estimate", "--model", model, "--device", "cpu", "--json"))
    row.run("targets", lambda: cli("targets", "--model", model, "--json"))
    matrix[arch] = row.cells
    failed = {k: v for k, v in row.cells.items() if v != "ok" and (arch, k) not in KNOWN_GAPS}
    assert not failed, json.dumps(failed, indent=1)
    fixed = [k for (a, k) in KNOWN_GAPS if a == arch and row.cells.get(k) == "ok"]
    assert not fixed, f"{arch}: {fixed} pass now; remove them from KNOWN_GAPS"


BEGIN, END = "<!-- matrix:begin -->", "<!-- matrix:end -->"


def write_matrix(rows: dict, cols: list[str], seconds: tuple[float, float], docs: Path) -> None:
    """docs/arch_matrix.json, and the table between the markers of docs/architectures.md."""
    from loralab.io import atomic_write_json, atomic_write_text

    atomic_write_json(docs / "arch_matrix.json", {"columns": cols, "rows": rows,
                                                  "wall_seconds": round(seconds[0], 1),
                                                  "cpu_seconds": round(seconds[1], 1)})
    header = "| architecture | " + " | ".join(cols) + " |"
    lines = [header, "|" + "---|" * (len(cols) + 1)]
    for arch, cells in rows.items():
        marks = [("ok" if cells[c] == "ok" else "FAIL") if c in cells else "-" for c in cols]
        lines.append(f"| {arch} | " + " | ".join(marks) + " |")
    cells = [v for r in rows.values() for v in r.values()]
    ok = sum(v == "ok" for v in cells)
    lines += ["", (f"**{ok} of {len(cells)} cells pass** ({len(rows)} architectures; "
                   f"'-': does not apply). The test module took {seconds[1]:.0f} s of CPU "
                   f"on one thread ({seconds[0]:.0f} s wall on a shared machine), "
                   f"{time.strftime('%Y-%m-%d')}.")]
    fails = [f"- {a}, {c}: {v}" for a, r in rows.items() for c, v in r.items() if v != "ok"]
    lines += ["", "Failing cells:", "", *fails] if fails else []
    doc = docs / "architectures.md"
    text = doc.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    atomic_write_text(doc, head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + tail)


def _eval_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert cli("eval", *args, "--json") == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_decoder_classifies(arch, root, data, capsys, tmp_path):
    """A causal LM classifies as in the Qwen3-0.6B tutorial: the *ForSequenceClassification
    class on the decoder, pad = EOS (its tokenizer has none), the score read at the
    last real token, the ``score`` head saved with the adapter; eval, merge and
    serve then give the same predictions."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from loralab.models import load_tokenizer

    model = save_arch(root / "models", arch)
    assert AutoTokenizer.from_pretrained(model).pad_token is None
    tok = load_tokenizer(str(model))
    assert tok.pad_token == tok.eos_token
    run = tmp_path / "run"
    assert train(model, data, run, "classify", "lora", "--max-steps", 3) == 0
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert {k for k in weights if ".score." in k or k.endswith("score.weight")}
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["score"])
    with_adapter = _eval_json(capsys, "--model", model, "--adapter", run,
                              "--data", data["classify"][1])
    assert cli("merge", "--adapter", run, "--output", tmp_path / "merged") == 0
    merged = _eval_json(capsys, "--model", tmp_path / "merged", "--data", data["classify"][1])
    a, b = with_adapter["metrics"], merged["metrics"]
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    assert b["confusion_matrix"] == a["confusion_matrix"]
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    texts = [t for t, _ in class_rows(5, seed=3)]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert not batch["attention_mask"].all()  # padded rows: the score must skip the padding
    with torch.no_grad():
        padded = torch.softmax(clf(**batch).logits, -1)  # (5, 3)
        single = torch.cat([torch.softmax(clf(**tok([t], return_tensors="pt")).logits, -1)
                            for t in texts])
    assert torch.allclose(padded, single, atol=1e-5)
    served = _serve_probs(model, run, texts)
    assert torch.allclose(torch.tensor(served), single, atol=1e-5)


def _serve_probs(model, adapter, texts) -> list[list[float]]:
    from fastapi.testclient import TestClient

    from loralab.serve.app import create_app
    from loralab.serve.server import LoraServer, ServeConfig

    server = LoraServer(ServeConfig(model=str(model), adapters={"clf": str(adapter)}, threads=1))
    with TestClient(create_app(server)) as client:
        r = client.post("/v1/classify", json={"model": "clf", "input": texts})
        assert r.status_code == 200, r.text
    return [[row["probabilities"][x] for x in LABELS] for row in r.json()["data"]]


def test_moe_experts_adapter_loads_in_peft(root, data, tmp_path, capsys):
    """LoRA on Qwen3-MoE's fused 3-D expert weights (--target-parameters experts):
    `targets` lists them, peft loads the adapter with the same logits, and merge
    folds it in."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loralab.lora import load_adapter

    model = save_arch(root / "models", "qwen3_moe")
    capsys.readouterr()
    assert cli("targets", "--model", model, "--rank", 2, "--json") == 0
    listed = json.loads(capsys.readouterr().out)["target_parameters"]
    assert [(g["name"], g["lora_per_layer"]) for g in listed] == [
        ("experts.gate_up_proj", 2 * 4 * (32 + 32)), ("experts.down_proj", 2 * 4 * (16 + 32))]
    run = tmp_path / "run"
    assert train(model, data, run, "sft", "lora", "--target-parameters", "experts",
                 "--max-steps", 2, "--lr", 0.05) == 0
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    keys = set(load_file(str(run / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(model).eval()
    with torch.no_grad():
        plain = base(ids).logits
        ours = load_adapter(AutoModelForCausalLM.from_pretrained(model), run).eval()
        logits = ours(ids).logits
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model),
                                           run / "adapter").eval()(ids).logits
    assert not torch.allclose(logits, plain, atol=1e-4)  # the trained experts changed it
    assert torch.allclose(theirs, logits, atol=1e-5)
    assert cli("merge", "--adapter", run, "--output", tmp_path / "merged") == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, logits, atol=1e-4)


def test_attention_default_for_every_architecture(root):
    """The `attention` preset resolves for each matrix model; an architecture
    outside the table goes by module names; one with no linear layer is one line."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.falcon import FalconConfig

    from loralab.errors import LoralabError
    from loralab.lora import find_targets
    from loralab.models import load_tokenizer

    tok = load_tokenizer("minilm")
    for arch in ARCHS:
        cfg = arch_config(arch, tok)
        found = find_targets(AutoModel.from_config(cfg), "attention")
        assert found and all("mlp" not in n and "intermediate" not in n for n in found), arch
    falcon = AutoModel.from_config(FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2))
    assert sorted({n.split(".")[-1] for n in find_targets(falcon, "attention")}) == [
        "dense", "query_key_value"]
    empty = torch_linear_free()
    with pytest.raises(LoralabError, match="has no linear layers for LoRA to adapt"):
        find_targets(empty, "attention")
    with pytest.raises(LoralabError, match="has no linear layers for LoRA to adapt"):
        find_targets(empty, "all-linear")
    assert AutoConfig  # the config class exists in this transformers


def torch_linear_free():
    """A model with embeddings and norms only (a config LoRA has nothing to wrap in)."""
    from torch import nn

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.norm = nn.LayerNorm(4)

    return Bag()
