"""TrainConfig: YAML + key=value + options, derived defaults, validation."""

from __future__ import annotations

import pytest
import yaml

from loralab.config import DEFAULT_LR, TrainConfig, build_config, config_from_dict, infer_task
from loralab.errors import LoralabError


def test_defaults_resolve_per_method_and_task():
    cfg = build_config()
    assert (cfg.model, cfg.data, cfg.method, cfg.task) == ("minilm", "tickets", "lora",
                                                           "classify")
    assert cfg.alpha == 16.0 and cfg.lr == 1e-3  # LoRA classifies with a fresh head
    assert DEFAULT_LR["lora"] == 2e-4
    assert cfg.max_length == 128 and cfg.metric == "f1" and cfg.batch_size == 16
    assert build_config(options={"method": "full"}).lr == 2e-5
    assert build_config(options={"method": "head"}).lr == 1e-3
    sft = build_config(options={"data": "instructions"})
    assert sft.task == "sft" and sft.metric == "loss" and sft.max_length == 512
    assert sft.lr == 2e-4
    assert not sft.metric_higher_is_better


def test_precedence_yaml_then_overrides_then_options(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rank: 4\nlr: 0.001\nepochs: 2\ntext-column: body\n")
    cfg = build_config(path, ["rank=16", "dropout=0.05"], {"lr": 3e-4})
    assert cfg.rank == 16 and cfg.lr == 3e-4 and cfg.epochs == 2.0 and cfg.dropout == 0.05
    assert cfg.text_column == "body" and cfg.alpha == 32.0


def test_round_trip_through_yaml():
    cfg = build_config(options={"rank": 4, "max_steps": 10, "seed": 7})
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_coercion_of_strings():
    cfg = build_config(overrides=["max_steps=none", "gradient_checkpointing=true",
                                  "epochs=1", "text_column=1"])
    assert cfg.max_steps is None and cfg.gradient_checkpointing is True
    assert cfg.epochs == 1.0 and cfg.text_column == "1"


@pytest.mark.parametrize("overrides,needle", [
    (["rank=2.5"], "bad value for rank"),
    (["quiet=maybe"], "bad value for quiet"),
    (["lr=-1"], "lr must be > 0"),
    (["method=prefix"], "unknown method"),
    (["method=head", "task=sft"], "does not fit task 'sft'"),
    (["metric=perplexity"], "does not fit task 'classify'"),
    (["epochs=0"], "nothing to train"),
    (["dropout=1"], "dropout must be in [0, 1)"),
    (["warmup_ratio=1.5"], "warmup_ratio"),
    (["batch_size=0"], "batch_size must be >= 1"),
    (["model="], "model cannot be empty"),
    (["no_equals"], "expected key=value"),
    (["colour=red"], "unknown setting 'colour'"),
])
def test_validation_messages(overrides, needle):
    with pytest.raises(LoralabError) as err:
        build_config(overrides=overrides)
    assert needle in str(err.value)


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- rank\n- 8\n")
    with pytest.raises(LoralabError, match="mapping"):
        build_config(path)
    with pytest.raises(LoralabError, match="not found"):
        build_config(tmp_path / "missing.yaml")


def test_task_inferred_from_data(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text('[{"instruction": "x", "output": "y"}]')
    chat = tmp_path / "c.jsonl"
    chat.write_text('{"messages": []}\n')
    table = tmp_path / "t.jsonl"
    table.write_text('{"text": "x", "label": "y"}\n')
    assert infer_task(str(alpaca)) == infer_task(str(chat)) == "sft"
    assert infer_task(str(table)) == infer_task("x.csv") == infer_task("tickets") == "classify"
    assert TrainConfig().task is None  # resolved lazily


@pytest.mark.parametrize("text, field, value", [
    ("1e-4", "lr", 1e-4), ("2E-5", "lr", 2e-5), (".5", "dropout", 0.5), ("1_000", "max_steps", 1000),
    ("1e3", "max_steps", 1000), ("8.0", "rank", 8), ("true", "fsdp", True), ("no", "quiet", False),
    ("[q_proj, v_proj]", "targets", "q_proj,v_proj"), ("q_proj,v_proj", "targets", "q_proj,v_proj"),
])
def test_values_as_users_write_them(tmp_path, text, field, value):
    """The same text means the same value in a YAML file and a key=value override."""
    assert getattr(build_config(overrides=[f"{field}={text}"]), field) == value
    path = tmp_path / "c.yaml"
    path.write_text(f"{field}: {text}\n")
    assert getattr(build_config(path), field) == value


def test_yaml_list_of_targets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("targets:\n  - query\n  - value\nlr: 3e-4\n")
    cfg = build_config(path)
    assert cfg.targets == "query,value" and cfg.lr == 3e-4


@pytest.mark.parametrize("override, needle", [
    ("lr=inf", "lr must be a finite"), ("alpha=nan", "alpha must be a finite"),
    ("epochs=inf", "epochs must be a finite"), ("epochs=nan", "epochs must be a finite"),
    ("dropout=nan", "dropout must be a finite"), ("max_grad_norm=inf", "max_grad_norm"),
    ("seed=18446744073709551616", "seed must be between"), ("rank=1.5", "whole number"),
    ("batch_size=abc", "whole number"), ("lr=1e-4x", "not a number"), ("fsdp=maybe", "true or false"),
    ("max_steps=99999999999", "max_steps must be between"), ("lr=1__0", "not a number"),
])
def test_bad_numbers_are_refused_with_the_field_named(override, needle):
    with pytest.raises(LoralabError, match=needle):
        build_config(overrides=[override])
