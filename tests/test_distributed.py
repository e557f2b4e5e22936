"""Data-parallel training on CPU over gloo, launched the way users launch it.

Two processes with batch b give the same per-step losses, eval metrics and
final weights as one process with batch 2b (full fine-tuning, LoRA, QLoRA,
instruction tuning); rank 0 alone writes the run dir; a rank that fails stops
every rank with one clear line from rank 0 and no final artifact, and the run
resumes from its checkpoint; a world size that does not divide the global
batch is refused. FSDP is refused on CPU (accelerate shards only across GPUs);
its code path is still run here by forcing accelerate's FSDP2 preparation
onto gloo in a test worker, and matches one process too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import cli
from safetensors.torch import load_file
from train_support import (
    class_rows,
    make_tokenizer,
    save_tiny,
    sft_records,
    write_csv,
    write_jsonl,
)

from loralab import config
from loralab.errors import LoralabError
from loralab.train import distributed

LAUNCH_TIMEOUT_S = 300
# rank 1 raises inside optimizer step 3 (after the checkpoint of step 2)
FAILING_WORKER = """
import sys
import loralab.train.loop as L
step = L.Loop.train_step
def train_step(self, micro):
    if self.rank == 1 and self.state.step == 2:
        raise RuntimeError("injected failure in rank 1")
    return step(self, micro)
L.Loop.train_step = train_step
from loralab.cli import main
main(sys.argv[1:])
"""
# accelerate prepares FSDP only for GPUs; force its FSDP2 path onto gloo/CPU
FSDP_ON_CPU_WORKER = """
import sys
from accelerate import Accelerator
from accelerate.utils import DistributedType
from loralab.train import distributed, run
distributed.check_backend = lambda cfg, cuda: None
def make_accelerator(cfg):
    acc = Accelerator(cpu=True, mixed_precision="no")
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = distributed.fsdp_plugin()
    return acc
run.make_accelerator = make_accelerator
from loralab.cli import main
main(sys.argv[1:])
"""


# ---- fixtures ------------------------------------------------------------------


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


def tiny_gpt2(root: Path) -> Path:
    """GPT-2 (hidden 32, 2 layers, tied embeddings) without dropout: ranks draw
    different dropout masks than one process would, so equality needs none."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = root / "tiny-gpt2-nodrop"
    tok = make_tokenizer("causal")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                     bos_token_id=4, eos_token_id=4, pad_token_id=0, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"bert": save_tiny(root, "bert"), "gpt2": tiny_gpt2(root)}  # bert: dropout 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    # 151 rows -> 121 train rows: the last global batch of 8 holds one row, so
    # one rank has none; 15 eval rows in batches of 6 -> 3 batches for 2 ranks
    return {"classify": write_csv(root / "tickets.csv", class_rows(151)),
            "sft": write_jsonl(root / "sft.jsonl", sft_records(48))}


# ---- launching -----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, *, script: Path | None = None, launcher: str = "torchrun",
           nproc: int = 2) -> subprocess.CompletedProcess:
    """``loralab ARGS`` in ``nproc`` processes on this host (loopback only)."""
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", port]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
               "--main_process_port", port]
    cmd += [str(script)] if script is not None else ["-m", "loralab"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd + [str(a) for a in args], check=False, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT_S, env=env)



def worker(tmp_path: Path, name: str, code: str) -> Path:
    path = tmp_path / name
    path.write_text(code)
    return path


# ---- reading runs ----------------------------------------------------------------

def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def weights(run: Path) -> dict[str, torch.Tensor]:
    name = "adapter/adapter_model.safetensors"
    if not (run / name).exists():
        name = "model/model.safetensors"
    return load_file(str(run / name))


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


# An attention key bias adds the same amount to every score of a query, so
# softmax cancels it: its gradient is rounding noise, which Adam's
# normalisation turns into full-size steps. It never changes an output.
NO_GRADIENT = ("attention.self.key.bias",)


def assert_same_run(two: Path, one: Path) -> None:
    a, b = losses(two), losses(one)
    assert [s for s, _ in a] == [s for s, _ in b] and a
    for (step, x), (_, y) in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(y), (step, x, y)
    wa, wb = weights(two), weights(one)
    assert wa.keys() == wb.keys()
    for key in wa:
        if not key.endswith(NO_GRADIENT):
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5, msg=key)
    ma, mb = metrics(two), metrics(one)
    assert (ma["world_size"], mb["world_size"]) == (2, 1)
    assert ma["train_tokens"] == mb["train_tokens"]  # counted on every rank, summed
    assert ma["steps"] == mb["steps"]
    for split in ("eval", "test"):  # eval shards gathered from both ranks
        for key, value in mb[split].items():
            if isinstance(value, float):
                assert ma[split][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (split, key)
            elif key in ("n", "tokens", "confusion_matrix"):
                assert ma[split][key] == value, (split, key)


def assert_written_once(run: Path, proc: subprocess.CompletedProcess) -> None:
    """Rank 0 alone wrote the run dir and printed the summary."""
    names = {p.name for p in run.iterdir()}
    assert names <= {"config.yaml", "labels.json", "log.jsonl", "metrics.json", "adapter",
                     "model"}, names  # no checkpoint/best left, no temporary dirs
    steps = [s for s, _ in losses(run)]
    assert steps == sorted(set(steps)), "every log line once"
    assert proc.stdout.count("run dir:") == 1, proc.stdout


# ---- equivalence ---------------------------------------------------------------------

CASES = {
    # name: (task, method, model, lr, launcher, options for the 2-process run); LoRA on
    # BERT is also run by the failure and FSDP tests below
    "classify-full": ("classify", "full", "bert", 3e-3, "torchrun", ["--global-batch-size", 8]),
    "classify-qlora": ("classify", "qlora", "bert", 1e-2, "torchrun", ["--batch-size", 4]),
    "sft-lora": ("sft", "lora", "gpt2", 1e-2, "accelerate", ["--batch-size", 4]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_with_twice_the_batch(models, data, tmp_path, case):
    task, method, kind, lr, launcher, batch = CASES[case]
    common = ["train", "--model", models[kind], "--data", data[task], "--task", task,
              "--method", method, "--lr", lr, "--rank", 4, "--targets", "all-linear",
              "--eval-every", 4, "log_every=1", "eval_batch_size=6", "--quiet"]
    # a whole epoch of classification meets the one-row batch (one rank idle)
    common += ["--epochs", 1] if method == "full" else ["--max-steps", 6]
    proc = launch(common + ["--output", tmp_path / "two", *batch], launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cli(*common, "--output", tmp_path / "one", "--batch-size", 8) == 0
    assert_same_run(tmp_path / "two", tmp_path / "one")
    assert_written_once(tmp_path / "two", proc)
    m = metrics(tmp_path / "two")
    assert (m["batch_size"], m["grad_accum"], m["global_batch_size"]) == (4, 1, 8)


# ---- failures -----------------------------------------------------------------------

def test_a_failing_rank_stops_all_and_the_run_resumes(models, data, tmp_path):
    lr = 1e-2
    args = ["train", "--model", models["bert"], "--data", data["classify"], "--method", "lora",
            "--lr", lr, "--max-steps", 4, "--eval-every", 2, "log_every=1", "--quiet"]
    run = tmp_path / "run"
    proc = launch(args + ["--output", run, "--batch-size", 4],
                  script=worker(tmp_path, "fail.py", FAILING_WORKER))
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]  # rank 0's line, once
    assert "process 1 of 2 failed: RuntimeError: injected failure in rank 1" in errors[0]
    assert f"--resume {run}" in errors[0]
    names = {p.name for p in run.iterdir()}
    assert not names & {"metrics.json", "adapter", "model"}, names
    assert not [n for n in names if ".tmp-" in n or ".old-" in n], names
    assert (run / "checkpoint" / "trainer_state.json").exists()  # whole, from step 2

    # one process cannot continue a two-process run: its batches would differ
    assert cli("train", "--resume", run, "--quiet") == 2
    resumed = launch(["train", "--resume", run, "--quiet"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert cli(*args, "--output", tmp_path / "one", "--batch-size", 8) == 0
    a, b = losses(run), losses(tmp_path / "one")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (step, x), (_, y) in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(y), (step, x, y)
    # Adam divides each gradient by its own size, so where one is near zero the
    # ranks' different summation order moves a weight by a visible part of a
    # step (up to lr); a wrong resume moves many weights by whole steps.
    wa, wb = weights(run), weights(tmp_path / "one")
    for key in wb:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-2 * lr, msg=key)
    assert metrics(run)["steps"] == 4


def test_world_size_that_does_not_divide_the_global_batch(models, data, tmp_path):
    out = tmp_path / "run"
    proc = launch(["train", "--model", models["bert"], "--data", data["classify"],
                   "--output", out, "--global-batch-size", 9, "--quiet"])
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]  # rank 0 speaks for both
    assert "global batch size 9 cannot be split over 2 process(es)" in errors[0]
    assert "multiple of 2" in errors[0] and "[rank" not in proc.stderr  # no traceback
    assert not out.exists()


def test_batch_arithmetic():
    assert config.per_process_batch(32, 2, None, 4) == 4
    assert config.per_process_batch(32, 2, 4, 4) == 4
    assert config.effective_batch(4, 2, 4) == 32
    with pytest.raises(LoralabError, match="not a multiple of 8"):
        config.per_process_batch(20, 2, None, 4)
    with pytest.raises(LoralabError, match="disagree"):
        config.per_process_batch(32, 1, 4, 4)


def test_global_batch_in_one_process(models, data, tmp_path):
    out = tmp_path / "run"
    assert cli("train", "--model", models["bert"], "--data", data["classify"], "--output", out,
               "--global-batch-size", 12, "--grad-accum", 3, "--max-steps", 2, "--quiet") == 0
    m = metrics(out)
    assert (m["batch_size"], m["grad_accum"], m["world_size"]) == (4, 3, 1)
    assert m["global_batch_size"] == 12


# ---- sharding ---------------------------------------------------------------------

def test_fsdp_is_refused_on_cpu(models, data, tmp_path, capsys, monkeypatch):
    base = ["train", "--model", models["bert"], "--data", data["classify"], "--quiet"]
    assert cli(*base, "--output", tmp_path / "a", "--fsdp") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "FSDP shards the model across CUDA GPUs" in err
    assert not (tmp_path / "a").exists()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # an accelerate config asking for it
    assert cli(*base, "--output", tmp_path / "b") == 2
    assert "FSDP" in capsys.readouterr().err and not (tmp_path / "b").exists()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert cli(*base, "--output", tmp_path / "c") == 2
    assert "DeepSpeed ZeRO shards" in capsys.readouterr().err


def test_backend_checks_on_gpus(monkeypatch):
    cfg = SimpleNamespace(fsdp=True, method="qlora", grad_accum=1)
    with pytest.raises(LoralabError, match="QLoRA does not run under FSDP"):
        distributed.check_backend(cfg, cuda=True)
    cfg.method = "lora"
    assert "fsdp_plugin" in distributed.accelerator_kwargs(cfg, cuda=True)
    plugin = distributed.accelerator_kwargs(cfg, cuda=True)["fsdp_plugin"]
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    cfg.fsdp = False
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(LoralabError, match="pip install deepspeed"):
            distributed.check_backend(cfg, cuda=True)


def test_deepspeed_config_is_checked_and_filled():
    def accelerator(stage, **ds):
        plugin = SimpleNamespace(zero_stage=stage, deepspeed_config=ds)
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))

    cfg = SimpleNamespace(batch_size=4, max_grad_norm=0.5)
    acc = accelerator(2, gradient_accumulation_steps="auto",
                      train_micro_batch_size_per_gpu="auto", gradient_clipping="auto")
    distributed._fit_deepspeed(cfg, acc)
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_clipping"] == 0.5
    with pytest.raises(LoralabError, match="ZeRO stage 3"):
        distributed._fit_deepspeed(cfg, accelerator(3))
    with pytest.raises(LoralabError, match="gradient_accumulation_steps=4"):
        distributed._fit_deepspeed(cfg, accelerator(2, gradient_accumulation_steps=4))
    with pytest.raises(LoralabError, match="optimizer or scheduler"):
        distributed._fit_deepspeed(cfg, accelerator(1, optimizer={"type": "AdamW"}))


def test_fsdp_version_1_is_refused():
    from accelerate.utils import DistributedType

    acc = SimpleNamespace(distributed_type=DistributedType.FSDP,
                          state=SimpleNamespace(deepspeed_plugin=None,
                                                fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    cfg = SimpleNamespace(save_checkpoints=True, keep_best=True)
    with pytest.raises(LoralabError, match="fsdp_version: 2"):
        distributed.adapt_to_backend(cfg, acc)
    acc.state.fsdp_plugin.fsdp_version = 2
    notes = distributed.adapt_to_backend(cfg, acc)
    assert not cfg.save_checkpoints and not cfg.keep_best and "no resumable" in notes[0]


def test_every_node_must_see_the_run_dir(tmp_path, monkeypatch):
    distributed.check_shared_output(tmp_path)  # one process: nothing to check
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(LoralabError, match="rank 1.*storage that every node mounts"):
        distributed.check_shared_output(tmp_path)
    (tmp_path / "config.yaml").write_text("{}")
    distributed.check_shared_output(tmp_path)


FSDP_CASES = {"classify-lora": ("classify", "lora", "bert", 1e-2),  # BERT: embedding unit
              "sft-full": ("sft", "full", "gpt2", 3e-3)}  # GPT-2: tied embeddings


@pytest.mark.parametrize("case", list(FSDP_CASES))
def test_fsdp_path_matches_one_process(models, data, tmp_path, case):
    task, method, kind, lr = FSDP_CASES[case]
    common = ["train", "--model", models[kind], "--data", data[task], "--task", task,
              "--method", method, "--lr", lr, "--rank", 4, "--max-steps", 6, "--eval-every", 3,
              "log_every=1", "eval_batch_size=6", "--quiet"]
    proc = launch(common + ["--output", tmp_path / "two", "--batch-size", 4, "--fsdp"],
                  script=worker(tmp_path, "fsdp.py", FSDP_ON_CPU_WORKER))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # sharded runs keep no resumable checkpoint and end with the last weights
    assert cli(*common, "--output", tmp_path / "one", "--batch-size", 8, "keep_best=false",
               "save_checkpoints=false") == 0
    assert_same_run(tmp_path / "two", tmp_path / "one")
    assert_written_once(tmp_path / "two", proc)
    two, one = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    # per-process tensor account: each rank holds about half the Adam state
    assert two["peak_memory"]["tensors"]["optimizer_bytes"] < (
        0.6 * one["peak_memory"]["tensors"]["optimizer_bytes"])


# ---- helpers -------------------------------------------------------------------------

def test_every_rank_does_the_same_work():
    batch = [7]  # fewer rows than ranks
    assert distributed.local_rows(batch, 0, 2) == ([7], 1.0)
    assert distributed.local_rows(batch, 1, 2) == ([7], 0.0)  # forward, weight 0
    assert distributed.local_rows([1, 2, 3], 1, 2) == ([3], 1.0)
    batches = [[0], [1], [2]]
    assert distributed.rank_batches(batches, 0, 2) == [[0], [2]]
    assert distributed.rank_batches(batches, 1, 2) == [[1], [2]]  # a repeat, dropped later
    assert distributed.rank_batches([[0]], 1, 2) == [[0]]  # no batch of its own
    assert distributed.rank_batches([], 1, 2) == []


def test_whole_trainable_leaves_plain_models_alone():
    model = torch.nn.Linear(3, 2)
    before = model.weight
    with distributed.whole_trainable(model):
        assert model.weight is before
    assert model.weight is before
