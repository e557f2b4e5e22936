"""The bad-input battery: every command, given a value or a file a careful user
could get wrong, exits 2 with one line on stderr (no traceback) and writes
nothing. Counted in docs/reliability.md.

Also here: a diverging run (non-finite loss) stops with one line and leaves no
artifact, and the one-line handler for exceptions no command anticipated."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import cli
from train_support import class_rows, save_tiny, sft_records, write_csv, write_jsonl

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny models, data, a trained adapter per model, and broken copies."""
    root = tmp_path_factory.mktemp("battery")
    e = {"bert": save_tiny(root, "bert"), "gpt2": save_tiny(root, "gpt2"),
         "llama": save_tiny(root, "llama"),
         "csv": write_csv(root / "d.csv", class_rows(40)),
         "jsonl": write_jsonl(root / "s.jsonl", sft_records(24))}
    for name, model, data in (("bert_run", e["bert"], e["csv"]),
                              ("gpt2_run", e["gpt2"], e["jsonl"])):
        assert cli("train", "--model", model, "--data", data, "--output", root / name,
                   "--max-steps", 2, "--max-length", 32, "--quiet") == 0
        e[name] = root / name / "adapter"
    truncated = root / "truncated"
    shutil.copytree(e["gpt2_run"], truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    e["truncated"] = truncated
    bad_json = root / "bad_json"
    shutil.copytree(e["gpt2_run"], bad_json)
    (bad_json / "adapter_config.json").write_text("{not json")
    e["bad_json"] = bad_json
    (root / "bad.yaml").write_text("rank: [unclosed\n")
    e["bad_yaml"] = root / "bad.yaml"
    (root / "a_file").write_text("x")
    e["file"] = root / "a_file"
    return e


def train(*extra):
    return lambda e, out: ["train", "--model", e["bert"], "--data", e["csv"], "--output", out,
                           "--max-steps", 2, "--quiet", *extra]


def evaluate(*extra, adapter="bert_run", model="bert", data="csv"):
    return lambda e, out: ["eval", "--model", e[model], "--adapter", e[adapter],
                           "--data", e[data], *extra]


def generate(*extra):
    return lambda e, out: ["generate", "--model", e["gpt2"], "--prompt", "say hello", *extra]


def merge(adapter="gpt2_run", output=None):
    return lambda e, out: ["merge", "--adapter", e[adapter],
                           "--output", output(e) if output else out]


def lab(kind, *extra):
    return lambda e, out: [kind, "--model", e["bert"], "--data", e["csv"], "--output", out,
                           "--max-steps", 1, *extra]


CASES = {
    # train: numbers (the config refuses them), files, options
    "train lr nan": train("--lr", "nan"),
    "train lr inf": train("--lr", "inf"),
    "train alpha inf": train("--alpha", "inf"),
    "train epochs nan": train("--epochs", "nan"),
    "train epochs inf": train("--epochs", "inf"),
    "train batch 0": train("--batch-size", 0),
    "train max-length -1": train("--max-length", -1),
    "train dropout 1.5": train("--dropout", 1.5),
    "train warmup 2": train("--warmup-ratio", 2),
    "train rank 0": train("--rank", 0),
    "train grad-accum 0": train("--grad-accum", 0),
    "train eval-every 0": train("--eval-every", 0),
    "train max-steps 0": train("--max-steps", 0),
    "train rank abc": train("rank=abc"),
    "train unknown key": train("colour=blue"),
    "train unknown option": train("--log-every", 2),
    "train bad method": train("--method", "bogus"),
    "train bad metric": train("--metric", "bleu"),
    "train missing data": lambda e, out: ["train", "--model", e["bert"], "--data",
                                          out.parent / "nope.csv", "--output", out],
    "train missing config": lambda e, out: ["train", out.parent / "nope.yaml", f"output={out}"],
    "train bad yaml": lambda e, out: ["train", e["bad_yaml"], f"output={out}"],
    "train output under a file": lambda e, out: train()(e, e["file"] / "run"),
    "train resume nothing": lambda e, out: ["train", "--resume", out],
    # eval
    "eval batch 0": evaluate("--batch-size", 0),
    "eval max-length 0": evaluate("--max-length", 0),
    "eval missing adapter": lambda e, out: evaluate()(e, out)[:4] + [out, "--data", e["csv"]],
    "eval adapter of another base": evaluate(adapter="gpt2_run", model="llama", data="jsonl"),
    "eval missing data": lambda e, out: evaluate()(e, out)[:-1] + [out.parent / "nope.csv"],
    "eval truncated adapter": evaluate(adapter="truncated", model="gpt2", data="jsonl"),
    "eval adapter config not json": evaluate(adapter="bad_json", model="gpt2", data="jsonl"),
    # generate
    "generate temperature nan": generate("--temperature", "nan"),
    "generate temperature -1": generate("--temperature", -1),
    "generate temperature inf": generate("--temperature", "inf"),
    "generate top-p 0": generate("--top-p", 0),
    "generate top-p 1.5": generate("--top-p", 1.5),
    "generate top-p nan": generate("--top-p", "nan"),
    "generate max-tokens 0": generate("--max-tokens", 0),
    "generate max-tokens past the context": generate("--max-tokens", 100000),
    "generate seed -1": generate("--seed", -1, "--temperature", 1),
    "generate seed 2^64": generate("--seed", 2**64, "--temperature", 1),
    "generate truncated adapter": lambda e, out: generate()(e, out) + ["--adapter",
                                                                        e["truncated"]],
    # merge
    "merge truncated adapter": merge("truncated"),
    "merge missing adapter": lambda e, out: ["merge", "--adapter", out.parent / "nope",
                                             "--output", out],
    "merge output exists": merge(output=lambda e: e["gpt2_run"].parent),
    "merge output under a file": merge(output=lambda e: e["file"] / "merged"),
    # estimate and targets
    "estimate batch 0": lambda e, out: ["estimate", "--model", e["bert"], "--batch-size", 0],
    "estimate seq-len -5": lambda e, out: ["estimate", "--model", e["bert"], "--seq-len", -5],
    "estimate lora-dropout nan": lambda e, out: ["estimate", "--model", e["bert"],
                                                 "--lora-dropout", "nan"],
    "estimate gpu abc": lambda e, out: ["estimate", "--model", e["bert"], "--gpu", "abc"],
    "estimate rank 0": lambda e, out: ["estimate", "--model", e["bert"], "--rank", 0],
    "targets rank 0": lambda e, out: ["targets", "--model", e["bert"], "--rank", 0],
    "targets missing model": lambda e, out: ["targets", "--model", out.parent / "no-model"],
    # compare and sweep: refused before any run starts
    "compare missing data": lambda e, out: ["compare", "--model", e["bert"], "--data",
                                            out.parent / "nope.csv", "--output", out],
    "compare bad method": lab("compare", "--methods", "bogus"),
    "compare rank 0": lab("compare", "--ranks", 0),
    "compare generations -1": lab("compare", "--generations", -1),
    "compare lr nan": lab("compare", "--lr", "nan"),
    "sweep lrs abc": lab("sweep", "--lrs", "abc"),
    "sweep lrs inf": lab("sweep", "--lrs", "inf"),
    "sweep alphas 0": lab("sweep", "--alphas", 0),
    "sweep ranks nan": lab("sweep", "--ranks", "nan"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line(env, name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = CASES[name](env, out)
    capsys.readouterr()
    code = cli(*argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"{name}: exit {code}: {err[-2000:]}"
    assert len(err.splitlines()) == 1 and err.startswith("error: "), f"{name}: {err[-2000:]}"
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], f"{name} wrote {list(tmp_path.iterdir())}"


def test_the_battery_is_large(env):
    commands = {CASES[n](env, env["csv"].parent / "x")[0] for n in CASES}
    assert len(CASES) >= 40
    assert commands >= {"train", "eval", "generate", "merge", "estimate", "targets",
                        "compare", "sweep"}


def test_misleading_errors_say_what_is_wrong(env, capsys):
    capsys.readouterr()
    assert cli(*evaluate(adapter="gpt2_run", model="llama", data="jsonl")(env, None)) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "tiny-gpt2" in err  # names the right base
    assert cli(*merge("truncated")(env, env["csv"].parent / "m")) == 2
    assert "corrupt" in capsys.readouterr().err


def test_diverging_run_stops_without_an_artifact(env, tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    code = cli("train", "--model", env["bert"], "--data", env["csv"], "--output", out,
               "--method", "full", "--lr", "1e6", "--max-steps", 8, "--eval-every", 1,
               "--quiet")
    lines = capsys.readouterr().err.strip().splitlines()  # the run's notices, then the error
    err = lines[-1]
    assert code == 2, lines
    assert [ln for ln in lines if ln.startswith("error: ")] == [err], lines
    assert "Traceback" not in "\n".join(lines) and "at step" in err and "lr" in err, err
    assert "learning rate is likely too high" in err
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    state = out / "checkpoint" / "trainer_state.json"
    if state.exists():  # the checkpoint kept is one with finite weights
        from safetensors.torch import load_file

        step = json.loads(state.read_text())["step"]
        assert f"(step {step})" in err
        weights = load_file(str(out / "checkpoint" / "trainable.safetensors"))
        assert all(bool(t.isfinite().all()) for t in weights.values())


def test_unexpected_exception_is_one_line_exit_1(env, monkeypatch, capsys):
    from loralab.commands import estimate

    def broken(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr("loralab.estimate.report.build_report", broken)
    assert estimate.cmd is not None
    capsys.readouterr()
    assert cli("estimate", "--model", env["bert"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rerun with --debug" in err and "KeyError" in err
    with pytest.raises(KeyError):
        cli("--debug", "estimate", "--model", env["bert"])


def test_known_exception_types_get_a_fix():
    import errno

    from safetensors import SafetensorError

    from loralab.errors import describe

    cases = [(OSError(errno.ENOSPC, "No space left on device", "/x/model.safetensors"),
              "no space left"),
             (OSError(errno.EROFS, "Read-only file system", "/x"), "read-only"),
             (OSError(errno.EACCES, "Permission denied", "/x"), "permission denied"),
             (SafetensorError("invalid header length"), "corrupt"),
             (OverflowError("can't convert negative int to unsigned"), "bad value")]
    for err, needle in cases:
        message, code = describe(err)
        assert code == 2 and needle in message and "Fix:" in message, message
