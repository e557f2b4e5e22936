"""Planning a comparison without running it: options passed through to the
runs, run names, fingerprints and the output dir's state."""

from __future__ import annotations

import json

import pytest

from loralab.errors import LoralabError
from loralab.lab.compare import plan_compare
from loralab.lab.outdir import is_finished, open_output, save_state
from loralab.lab.plan import differing, essential, parse_train_args
from loralab.lab.sweep import plan_sweep


def test_train_options_pass_through_in_every_spelling():
    args = ["--grad-accum", "2", "--lr=1e-4", "warmup_ratio=0.1", "--no-group-by-length",
            "--gradient-checkpointing"]
    assert parse_train_args(args) == {"grad_accum": 2, "lr": 1e-4, "warmup_ratio": 0.1,
                                      "group_by_length": "false",
                                      "gradient_checkpointing": "true"}
    with pytest.raises(LoralabError, match="cannot read 'stray'"):
        parse_train_args(["stray"])


def test_compare_plans_one_run_per_method_and_rank(tmp_path):
    plan = plan_compare(methods="full,head,lora,qlora", ranks="4,16",
                        train_args=["--epochs", "2", "--grad-accum", "2", "--weight-decay",
                                    "1e-2"], output=tmp_path)
    assert plan.configs["full"].weight_decay == 0.01
    assert [r.name for r in plan.runs] == ["full", "head", "lora-r4", "lora-r16", "qlora-r4",
                                           "qlora-r16"]
    cfg = plan.configs["qlora-r16"]
    assert (cfg.method, cfg.rank, cfg.alpha, cfg.epochs, cfg.grad_accum) == \
        ("qlora", 16, 32.0, 2.0, 2)
    assert plan.configs["full"].lr == 2e-5 and plan.configs["lora-r4"].lr == 1e-3
    assert "--methods full,head,lora,qlora --ranks 4,16" in plan.command
    assert plan.command.endswith("--epochs 2 --grad-accum 2 --weight-decay 1e-2")


def test_default_methods_follow_the_task(tmp_path):
    data = tmp_path / "instructions.jsonl"
    data.write_text(json.dumps({"instruction": "say hi", "input": "", "output": "hi"}) + "\n")
    general = tmp_path / "general.txt"
    general.write_text("ordinary words of prose " * 40)
    plan = plan_compare(data=str(data), general_text=str(general), output=tmp_path / "o")
    assert plan.task == "sft" and [r.name for r in plan.runs] == ["full", "lora-r8", "qlora-r8"]
    assert plan.configs["full"].model == "smollm2-135m"
    assert plan.configs["full"].general_text == str(general.resolve())
    assert [r.name for r in plan_compare(output=tmp_path / "c").runs] == \
        ["full", "head", "lora-r8", "qlora-r8"]


def test_fingerprint_ignores_the_run_list_but_not_the_settings(tmp_path):
    base = plan_compare(output=tmp_path, train_args=["--epochs", "2"])
    assert plan_compare(output=tmp_path, train_args=["--epochs", "2"],
                        methods="lora", ranks="4").fingerprint() == base.fingerprint()
    assert plan_compare(output=tmp_path, train_args=["--epochs", "3"]).fingerprint() \
        != base.fingerprint()
    assert plan_compare(output=tmp_path, train_args=["--epochs", "2", "--seed", "1"]) \
        .fingerprint() != base.fingerprint()


def test_fingerprint_follows_the_data_content(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(20)))
    first = plan_compare(data=str(data), output=tmp_path / "o").fingerprint()
    data.write_text(data.read_text() + "one more,1\n")
    assert plan_compare(data=str(data), output=tmp_path / "o").fingerprint() != first


def test_fingerprint_follows_a_saved_dataset_directory(tmp_path):
    """A ``save_to_disk`` dir is hashed by its files: re-saved with one more row,
    it is another comparison; untouched, the same."""
    from datasets import Dataset

    rows = {"text": [f"row {i}" for i in range(20)], "label": [str(i % 2) for i in range(20)]}
    data = tmp_path / "ds"
    Dataset.from_dict(rows).save_to_disk(str(data))
    first = plan_compare(data=str(data), output=tmp_path / "o").fingerprint()
    assert plan_compare(data=str(data), output=tmp_path / "o").fingerprint() == first
    rows["text"].append("one more")
    rows["label"].append("1")
    import shutil

    shutil.rmtree(data)
    Dataset.from_dict(rows).save_to_disk(str(data))
    assert plan_compare(data=str(data), output=tmp_path / "o").fingerprint() != first


def test_sweep_grid_names_every_setting():
    plan = plan_sweep(ranks="2,8", alphas="2r,16", targets="attention,all-linear",
                      lrs="1e-4", output="unused")
    names = [r.name for r in plan.runs]
    assert names[:2] == ["full", "head"]
    assert "lora-r8-a16-all-linear-lr0.0001" in names and "lora-r2-a4-attention-lr0.0001" \
        in names and "lora-r2-a16-attention-lr0.0001" in names
    assert len(names) == len(set(names)) == 2 + 2 * 2 * 2 - 2  # r=8: 2r is 16
    cfg = plan.configs["lora-r2-a16-all-linear-lr0.0001"]
    assert (cfg.rank, cfg.alpha, cfg.targets, cfg.lr) == (2, 16.0, "all-linear", 1e-4)


def test_output_dir_state_refuses_another_comparison(tmp_path):
    out = tmp_path / "out"
    plan = plan_compare(output=out, methods="head")
    state = open_output(plan, overwrite=False)
    assert state["fingerprint"] == plan.fingerprint()
    (out / "head").mkdir()
    state["runs"]["head"] = {"status": "ok", "fingerprint": plan.run_fingerprint("head")}
    save_state(out, state)
    assert not is_finished(plan, state, "head")  # no metrics.json: not finished
    (out / "head" / "metrics.json").write_text("{}")
    assert is_finished(plan, state, "head")
    other = plan_compare(output=out, methods="head", train_args=["--epochs", "1"])
    with pytest.raises(LoralabError, match=r"holds a different comparison \(differs in epochs\)"):
        open_output(other, overwrite=False)
    assert (out / "head" / "metrics.json").exists()
    fresh = open_output(other, overwrite=True)
    assert fresh["runs"] == {} and not (out / "head").exists()


def test_an_option_added_later_off_by_default_keeps_the_comparison():
    old = {"model": "minilm", "epochs": 2.0, "general_text": None}
    assert essential({**old, "fsdp": False, "new_list": []}) == essential(old)
    assert essential({**old, "dropout": 0.0}) != essential(old)  # a real value stays
    assert differing(old, {**old, "fsdp": True, "epochs": 3.0}) == ["epochs", "fsdp"]
