"""loralab estimate: counts against materialized tiny models, activations against
the tensors autograd really saves, preset totals, and bad input."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import transformers
from conftest import cli
from tiny_models import ARCHS

from loralab.estimate import (
    EstimateConfig,
    Estimator,
    estimate,
    load_spec,
    parse_size,
)
from loralab.estimate.explain import explain_rows
from loralab.lora import LoRAConfig, inject_lora, trainable_report
from loralab.lora.quant import quantize_model_4bit
from loralab.train import lm_loss
from loralab.train.gated_mlp import use_fused_gated_mlp
from loralab.train.memory import weight_account

VOCAB = 96
TINY = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": VOCAB, "pad_token_id": 0},
    "qwen3": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "vocab_size": VOCAB,
              "tie_word_embeddings": True, "pad_token_id": 0},
    "bert": {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
             "vocab_size": VOCAB},
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64,
             "n_layer": 2, "n_head": 4, "vocab_size": VOCAB, "n_positions": 64,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
}
TASK = {"llama": "sft", "qwen3": "sft", "bert": "classify", "gpt2": "sft"}
# the matrix's other architectures (tests/tiny_models.py ARCHS), two layers each
NEW_ARCHS = ("gemma2", "gemma3_text", "phi3", "olmo2", "qwen3_moe", "electra", "deberta-v2",
             "modernbert")


def arch_file(tmp_path, arch: str) -> str:
    _, kwargs, _ = ARCHS[arch]
    fields = {"model_type": arch, **kwargs, "num_hidden_layers": 2, "vocab_size": VOCAB,
              "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if arch == "modernbert":
        fields.update(cls_token_id=1, sep_token_id=2)
    path = tmp_path / f"{arch}.json"
    path.write_text(json.dumps(fields))
    return str(path)


def write_config(tmp_path, kind: str, **changes):
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps({**TINY[kind], **changes}))
    return str(path)


def materialize(spec, dtype=torch.float32):
    """A real model from the same config (random weights)."""
    cls = (transformers.AutoModelForSequenceClassification if spec.task == "classify"
           else transformers.AutoModelForCausalLM)
    torch.manual_seed(0)
    return cls.from_config(spec.config).to(dtype)


def apply(model, method: str, task: str, rank=4, targets="attention", dropout=0.0,
          use_dora=False):
    if method in ("lora", "qlora"):
        inject_lora(model, LoRAConfig(r=rank, targets=targets, dropout=dropout, task=task,
                                      use_dora=use_dora))
    elif method == "head":
        inject_lora(model, LoRAConfig(r=rank, task="classify"), target_names=[])
    use_fused_gated_mlp(model)  # as loralab train loads it
    return model


# -- parameters --------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize("method", ["full", "lora", "head"])
def test_counts_match_materialized_model(tmp_path, kind, method):
    spec = load_spec(write_config(tmp_path, kind))
    if method == "head" and spec.task == "sft":
        pytest.skip("head is a classification method")
    est = estimate(spec, EstimateConfig(method=method, precision="fp32", rank=4,
                                        targets="all-linear", device="cpu"))
    model = apply(materialize(spec), method, spec.task, targets="all-linear")
    report = trainable_report(model)
    assert est.params["total"] == report["total"]
    assert est.params["trainable"] == report["trainable"]
    acc = weight_account(model)
    assert est.bytes["weights"] == acc["weights_bytes"]
    assert est.weights_by_dtype == acc["weights_by_dtype"]


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_qlora_weights_match_bitsandbytes(tmp_path, kind):
    spec = load_spec(write_config(tmp_path, kind))
    est = estimate(spec, EstimateConfig(method="qlora", precision="fp32", rank=4,
                                        device="cpu"))
    model = materialize(spec)
    quantize_model_4bit(model, compute_dtype=torch.float32)
    apply(model, "qlora", spec.task)
    acc = weight_account(model)
    assert est.weights_by_dtype == acc["weights_by_dtype"]
    assert est.params["quantized"] == acc["quantized_params"]
    assert est.params["trainable"] == trainable_report(model)["trainable"]


def test_optimizer_and_gradient_bytes_match_a_real_step(tmp_path):
    spec = load_spec(write_config(tmp_path, "llama"))
    for method, optim in (("full", "adamw"), ("lora", "adamw"), ("lora", "sgd")):
        est = estimate(spec, EstimateConfig(method=method, precision="fp32", optimizer=optim,
                                            rank=4, device="cpu"))
        model = apply(materialize(spec), method, spec.task)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = (torch.optim.AdamW(params) if optim == "adamw"
               else torch.optim.SGD(params, lr=0.1))
        ids = torch.randint(3, VOCAB, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
        opt.step()
        state = sum(v.numel() * v.element_size() for s in opt.state.values()
                    for v in s.values() if torch.is_tensor(v))
        assert est.bytes["gradients"] == grads
        assert est.bytes["optimizer"] == state


def test_lora_params_are_rank_times_in_plus_out(tmp_path):
    spec = load_spec(write_config(tmp_path, "llama"))
    est = estimate(spec, EstimateConfig(method="lora", rank=8, targets="q_proj,v_proj"))
    # q: 64 -> 64, v: 64 -> 32 (2 kv heads of 16), 2 layers
    assert est.params["lora"] == 2 * 8 * ((64 + 64) + (64 + 32))
    assert est.params["lora_layers"] == 4


@pytest.mark.parametrize("name,total", [
    ("llama-2-7b", 6_738_415_616), ("llama-3-8b", 8_030_261_248),
    ("mistral-7b", 7_241_732_096), ("llama-3-70b", 70_553_706_496),
    ("smollm2-135m", 134_515_008), ("qwen3-0.6b", 596_049_920), ("gpt2", 124_439_808),
])
def test_preset_totals(name, total):
    spec = load_spec(name)
    assert estimate(spec, EstimateConfig(method="full")).params["total"] == total


@pytest.mark.parametrize("name,base", [
    ("bert-base-uncased", 109_482_240), ("roberta-base", 124_645_632),
    ("distilbert-base-uncased", 66_362_880), ("minilm", 22_713_216),
])
def test_encoder_presets_are_base_plus_head(name, base):
    spec = load_spec(name, num_labels=2)
    total = estimate(spec, EstimateConfig(method="full")).params["total"]
    h = spec.config.hidden_size
    head = 2 * h + 2 + (h * h + h if name.startswith("distil") else 0)  # + pre_classifier
    assert total == base + head


# -- activations: the tape against what autograd saves -------------------------------

def saved_bytes(model, forward) -> int:
    """Bytes of distinct storages autograd saves in ``forward()``, a training forward."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def measure_step(spec, model, batch: int, seq: int, padded: bool) -> int:
    """Saved bytes of one training forward as ``loralab train`` runs it: the
    causal-LM loss chunked over the labelled positions (train/lm_loss.py)."""
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (batch, seq))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, seq // 2:] = 0
    if spec.task == "sft":
        rows = {"input_ids": ids, "attention_mask": mask, "labels": ids}
        return saved_bytes(model, lambda: lm_loss.causal_lm_loss_sum(model, rows, model))
    labels = torch.zeros(batch, dtype=torch.long)
    return saved_bytes(model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels))


def check_saved(spec, method, dtype, padded, dropout=0.0, rel=0.02, use_dora=False):
    batch, seq = 2, 24
    precision = "fp32" if dtype == torch.float32 else "bf16"
    cfg = EstimateConfig(method=method, precision=precision, rank=4, targets="all-linear",
                         lora_dropout=dropout, batch_size=batch, seq_len=seq, device="cpu",
                         padded=padded, use_dora=use_dora)
    expected = Estimator(spec, cfg).activations(batch)["activations"]
    model = apply(materialize(spec, dtype), method, spec.task, targets="all-linear",
                  dropout=dropout, use_dora=use_dora)
    assert expected == pytest.approx(measure_step(spec, model, batch, seq, padded), rel=rel)


@pytest.mark.parametrize("kind,method,dtype,padded,dropout", [
    ("llama", "full", torch.float32, False, 0.0),
    ("llama", "lora", torch.bfloat16, True, 0.0),
    ("qwen3", "lora", torch.float32, True, 0.1),
    ("bert", "full", torch.float32, True, 0.0),
    ("bert", "lora", torch.bfloat16, False, 0.0),
    ("bert", "head", torch.float32, False, 0.0),
    ("gpt2", "full", torch.bfloat16, False, 0.0),
    ("gpt2", "lora", torch.float32, True, 0.1),
])
def test_activations_match_saved_tensors(tmp_path, kind, method, dtype, padded, dropout):
    check_saved(load_spec(write_config(tmp_path, kind)), method, dtype, padded, dropout)


@pytest.mark.parametrize("kind,dropout", [("llama", 0.0), ("qwen3", 0.1), ("bert", 0.0)])
def test_dora_params_and_activations_match_the_model(tmp_path, kind, dropout):
    """DoRA: the magnitude vectors in the parameter count (one per output
    feature of each adapted layer) and the two (tokens x out) tensors each
    DoRA layer keeps for backward, against the materialized model."""
    spec = load_spec(write_config(tmp_path, kind))
    cfg = EstimateConfig(method="lora", precision="fp32", rank=4, targets="all-linear",
                         device="cpu", use_dora=True)
    est = estimate(spec, cfg)
    model = apply(materialize(spec), "lora", spec.task, targets="all-linear", use_dora=True)
    assert est.params["trainable"] == trainable_report(model)["trainable"]
    plain = estimate(spec, EstimateConfig(method="lora", precision="fp32", rank=4,
                                          targets="all-linear", device="cpu"))
    assert est.params["trainable"] > plain.params["trainable"]
    check_saved(spec, "lora", torch.float32, False, dropout, use_dora=True)


@pytest.mark.parametrize("arch", NEW_ARCHS)
@pytest.mark.parametrize("method,dtype", [("full", torch.float32), ("lora", torch.bfloat16)])
def test_new_families_match_saved_tensors(tmp_path, arch, method, dtype):
    """Gemma 2/3, Phi-3, OLMo 2, Qwen3-MoE (k of E experts per token), ELECTRA,
    DeBERTa-v2 and ModernBERT: the layer programs against what autograd saves."""
    task = "sft" if ARCHS[arch][2] == "decoder" else "classify"
    check_saved(load_spec(arch_file(tmp_path, arch), task=task), method, dtype, False)


@pytest.mark.parametrize("arch", ["gemma3_text", "phi3", "qwen3_moe", "electra", "deberta-v2",
                                  "modernbert"])
def test_new_families_padded(tmp_path, arch):
    """A padding mask reaching attention; one kv head (the tiny configs' MQA):
    repeat_kv's expand is then a view, not a copy."""
    task = "sft" if ARCHS[arch][2] == "decoder" else "classify"
    check_saved(load_spec(arch_file(tmp_path, arch), task=task), "lora", torch.float32, True)


@pytest.mark.parametrize("params", ["experts", "experts.down_proj"])
def test_lora_on_moe_experts(tmp_path, params):
    """--target-parameters: peft's ParamWrapper factors counted, and the merged
    W + BA each sparse layer's expert matmuls save."""
    spec = load_spec(arch_file(tmp_path, "qwen3_moe"), task="sft")
    batch, seq = 2, 24
    cfg = EstimateConfig(method="lora", precision="fp32", rank=4, target_parameters=params,
                         batch_size=batch, seq_len=seq, device="cpu", padded=False)
    est = Estimator(spec, cfg)
    model = materialize(spec)
    inject_lora(model, LoRAConfig(r=4, targets="attention", task="sft",
                                  target_parameters=params))
    counts = est.at().params
    assert counts["trainable"] == trainable_report(model)["trainable"]
    assert counts["lora"] > estimate(spec, replace(cfg, target_parameters=None)).params["lora"]
    measured = measure_step(spec, model, batch, seq, False)
    assert est.activations(batch)["activations"] == pytest.approx(measured, rel=0.02)


def test_approximate_programs_say_so(tmp_path, capsys):
    est = estimate(load_spec(arch_file(tmp_path, "qwen3_moe")), EstimateConfig())
    assert any("MoE" in note for note in est.approximate)
    assert estimate(load_spec(arch_file(tmp_path, "phi3")), EstimateConfig()).approximate == []
    out = run_cli(["estimate", "--model", arch_file(tmp_path, "qwen3_moe"), "--method",
                   "lora"], capsys)
    assert "approximate: MoE experts" in out


def peak_bytes(fn) -> int:
    """Peak of the CPU allocations made while ``fn()`` runs (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("chunk_rows", [None, 8])
@pytest.mark.parametrize("path", ["grads-in-forward", "checkpointed"])
def test_chunked_loss_term_matches_measured_peak(tmp_path, monkeypatch, chunk_rows, path):
    """The loss's memory follows train/lm_loss.py: the gathered rows and the
    live chunk's fp32 logits, log-softmax and gradient, never (B, T, V), with
    the chunks' gradients taken in the forward and with the chunks recomputed
    in the backward (as for a big trainable head). The 2^25-element chunk is
    shrunk to 8 rows to see the cap work."""
    if chunk_rows:
        monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", chunk_rows * 1000)
    if path == "checkpointed":
        monkeypatch.setattr(lm_loss, "GRADS_IN_FORWARD_ELEMENTS", -1)
    spec = load_spec(write_config(tmp_path, "llama", vocab_size=1000))
    batch, seq = 2, 64
    est = Estimator(spec, EstimateConfig(method="lora", precision="fp32", batch_size=batch,
                                         seq_len=seq, device="cpu"))
    acts = est.activations(batch)
    n = batch * (seq - 1)
    hidden = torch.randn(batch, seq, 64, requires_grad=True)
    labels = torch.randint(0, 1000, (batch, seq))
    lm_head = torch.nn.Linear(64, 1000, bias=False).requires_grad_(False)

    def step():
        lm_loss.chunked_loss_sum(hidden, labels, lm_head).backward()

    saved = n * (64 * 4 + 8) + batch * (seq - 1)  # rows, int64 targets, bool mask
    assert acts["logits"] + saved == pytest.approx(peak_bytes(step), rel=0.05)
    if chunk_rows:  # the rows' gradient, one chunk's 2 or 3 fp32 copies, 16 RNG states
        rng, copies = (torch.get_rng_state().numel(), 3) if path == "checkpointed" else (0, 2)
        assert acts["logits"] == n * 64 * 4 + copies * 4 * chunk_rows * 1000 + 16 * rng
        assert acts["logits"] < batch * seq * 3 * 4 * 1000  # the plain path's logits


def test_lm_task_estimates_like_sft(tmp_path, capsys):
    spec_path = write_config(tmp_path, "llama")
    cfg = EstimateConfig(method="lora", batch_size=2, seq_len=64)
    sft = estimate(load_spec(spec_path, task="sft"), cfg)
    lm = estimate(load_spec(spec_path, task="lm"), cfg)
    assert lm.task == "lm" and lm.bytes == sft.bytes and lm.params == sft.params
    data = json.loads(run_cli(["estimate", "--model", spec_path, "--task", "lm", "--json"],
                              capsys))
    assert [e["method"] for e in data["estimates"]] == ["full", "lora", "qlora"]
    assert cli("estimate", "--model", "minilm", "--task", "lm") == 2


def test_micro_batch_tokens_sets_the_pass(tmp_path, capsys):
    """A token budget is what one pass holds (rows = budget // seq), whatever
    --batch-size says; by default the budget is batch x seq."""
    spec = load_spec(write_config(tmp_path, "llama"))

    def at(**kw):
        return Estimator(spec, EstimateConfig(method="lora", seq_len=256, **kw)).at()

    default, rows4 = at(batch_size=16), at(batch_size=4)
    assert at(batch_size=16, micro_batch_tokens=16 * 256).bytes == default.bytes
    budget = at(batch_size=16, micro_batch_tokens=4 * 256)
    assert budget.bytes == rows4.bytes
    assert budget.to_dict()["rows_per_pass"] == 4 and budget.config.batch_size == 16
    more = at(batch_size=4, micro_batch_tokens=8 * 256 + 100)
    assert more.bytes["activations"] > at(batch_size=8).bytes["activations"]
    data = json.loads(run_cli(["estimate", "--model", "gpt2", "--method", "lora", "--seq-len",
                               "512", "--micro-batch-tokens", "2048", "--json"], capsys))
    assert data["estimates"][0]["micro_batch_tokens"] == 2048
    assert data["estimates"][0]["rows_per_pass"] == 4
    assert cli("estimate", "--model", "gpt2", "--seq-len", "512",
               "--micro-batch-tokens", "100") == 2
    assert "smaller than one row" in capsys.readouterr().err


def test_gradient_checkpointing_keeps_layer_inputs_only(tmp_path):
    spec = load_spec(write_config(tmp_path, "llama", num_hidden_layers=6))
    cfg = EstimateConfig(method="full", batch_size=4, seq_len=256)
    plain = Estimator(spec, cfg).at().bytes["activations"]
    ckpt = Estimator(spec, EstimateConfig(method="full", batch_size=4, seq_len=256,
                                          grad_checkpointing=True)).at().bytes["activations"]
    assert ckpt < plain / 2


# -- the breakdown -----------------------------------------------------------------------

def test_monotonic_in_batch_and_seq():
    spec = load_spec("smollm2-135m")
    for method in ("full", "lora", "qlora"):
        totals_b = [estimate(spec, EstimateConfig(method=method, batch_size=b, seq_len=256))
                    .total for b in (1, 2, 4, 8)]
        totals_s = [estimate(spec, EstimateConfig(method=method, batch_size=2, seq_len=s))
                    .total for s in (64, 128, 512, 2048)]
        assert totals_b == sorted(totals_b) and len(set(totals_b)) == 4
        assert totals_s == sorted(totals_s) and len(set(totals_s)) == 4


@pytest.mark.parametrize("name", ["llama-2-7b", "minilm", "gpt2"])
def test_qlora_below_lora_below_full(name):
    spec = load_spec(name)
    cfg = {"batch_size": 1, "seq_len": 256, "grad_checkpointing": True}
    t = {m: estimate(spec, EstimateConfig(method=m, **cfg)).total
         for m in ("full", "lora", "qlora")}
    assert t["qlora"] < t["lora"] < t["full"]


def test_nf4_costs_4_127_bits_per_weight():
    spec = load_spec("llama-2-7b")
    est = estimate(spec, EstimateConfig(method="qlora"))
    bits = 8 * (est.weights_by_dtype["nf4"] + est.weights_by_dtype["nf4_quant_state"]) \
        / est.params["quantized"]
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)  # QLoRA §3


def test_bytes_per_param_of_published_tables():
    rows = explain_rows(load_spec("llama-2-7b"))
    full = [r for r in rows if r["states_only"]]
    assert [r["bytes_per_param"] for r in full] == pytest.approx([12, 16, 16, 24], abs=1e-3)
    assert [r["nominal_7b_bytes"] / 1e9 for r in full] == pytest.approx([84, 112, 112, 168])
    assert all(r["states_bytes"] < r["nominal_7b_bytes"] for r in full)  # 6.74e9 < 7e9
    qlora = next(r for r in rows if "QLoRA r=16" in r["assumption"])
    assert 4e9 <= qlora["peak_bytes"] <= 6e9


def test_max_batch_size_is_the_largest_that_fits():
    est = Estimator(load_spec("llama-2-7b"), EstimateConfig(method="qlora", seq_len=512))
    cap = parse_size("24GB")
    b = est.max_batch_size(cap)
    assert b >= 1
    assert est.at(b).total <= cap < est.at(b + 1).total
    assert est.max_batch_size(10**6) == 0


def test_adamw_8bit_keeps_small_tensors_in_fp32(tmp_path):
    spec = load_spec(write_config(tmp_path, "llama"))
    est = estimate(spec, EstimateConfig(method="full", optimizer="adamw-8bit"))
    numels = [p.numel() for p in spec.model.parameters()]
    expect = sum(8 * n if n < 4096 else 2 * n + 8 * math.ceil(n / 256) for n in numels)
    assert est.bytes["optimizer"] == expect


def test_parse_size_units():
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("80") == 80 * 10**9
    assert parse_size("1.5 TB") == 1.5e12


# -- the command -------------------------------------------------------------------------

def run_cli(args, capsys) -> str:
    """stdout of ``loralab ARGS`` run in-process, which must succeed."""
    code = cli(*args)
    assert code == 0, capsys.readouterr()
    return capsys.readouterr().out


def test_cli_json_all_methods(capsys):
    out = run_cli(["estimate", "--model", "minilm", "--gpu", "8GB", "--json"], capsys)
    data = json.loads(out)
    assert [e["method"] for e in data["estimates"]] == ["full", "lora", "qlora", "head"]
    for e in data["estimates"]:
        assert set(e["bytes"]) >= {"weights", "gradients", "optimizer", "activations",
                                   "total", "master_weights", "overhead"}
        assert e["gpu"]["fits"] and e["gpu"]["max_batch_size"] >= 16


def test_cpu_estimate_states_the_measured_rss_range(capsys):
    """On CPU the estimate is live memory; the range RSS has measured at is given
    beside it (BENCHMARKS.md), in the JSON and the table."""
    from loralab.estimate.formula import CPU_RSS_MEASURED_RATIO

    data = json.loads(run_cli(["estimate", "--model", "minilm", "--method", "lora",
                               "--device", "cpu", "--json"], capsys))
    b = data["estimates"][0]["bytes"]
    lo, hi = CPU_RSS_MEASURED_RATIO
    assert (b["rss_low"], b["rss_high"]) == (int(b["total"] * lo), int(b["total"] * hi))
    table = run_cli(["estimate", "--model", "minilm", "--method", "lora", "--device", "cpu"],
                    capsys)
    assert "peak RSS, measured range" in table and f"{lo:g}-{hi:g}x" in table
    gpu = json.loads(run_cli(["estimate", "--model", "minilm", "--json"], capsys))
    assert "rss_low" not in gpu["estimates"][0]["bytes"]


def test_cli_table_and_explain(capsys):
    out = run_cli(["estimate", "--model", "smollm2-135m", "--method", "qlora",
                   "--gpu", "4GB"], capsys)
    assert "qlora" in out and "nf4" in out and "largest batch" in out
    out = run_cli(["estimate", "--explain"], capsys)
    assert "84.00 GB" in out and "112.00 GB" in out and "168.00 GB" in out


@pytest.mark.parametrize("args,needle", [
    (["--model", "llama-9z"], "unknown model preset"),
    (["--model", "gpt2", "--batch-size", "0"], "batch_size"),
    (["--model", "gpt2", "--seq-len", "-4"], "seq_len"),
    (["--model", "gpt2", "--gpu", "24XB"], "memory size"),
    (["--model", "gpt2", "--method", "head"], "head"),
    (["--model", "minilm", "--task", "sft"], "encoder"),
    (["--model", "gpt2", "--targets", "nope_proj"], "match no linear layer"),
    (["--model", "gpt2", "--rank", "0"], "rank"),
    (["--model", "gpt2", "--lora-dropout", "1.5"], "lora_dropout"),
    (["--explain", "--model", "nonexistent-preset"], "unknown model preset"),
])
def test_bad_input_exits_2(capsys, args, needle):
    assert cli("estimate", *args) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_config_missing_fields_exits_2(tmp_path, capsys):
    fields = {k: v for k, v in TINY["llama"].items() if k != "hidden_size"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(fields))
    assert cli("estimate", "--model", str(tmp_path)) == 2
    assert "lacks hidden_size" in capsys.readouterr().err


def test_hub_id_offline_names_presets(monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert cli("estimate", "--model", "some-org/not-a-model-xyz") == 2
    err = capsys.readouterr().err
    assert "llama-2-7b" in err and "offline" in err


def test_reproduces_korthikanti_per_layer_formula():
    """Korthikanti et al. 2022 §4.1: a GPT/BERT layer in 16-bit with 1-byte dropout
    masks and unfused attention keeps sbh(34 + 5as/h) bytes (+ the LayerNorm stats)."""
    spec = load_spec("bert-base-uncased")
    spec.model.config._attn_implementation = "eager"
    seq = 512
    est = Estimator(spec, EstimateConfig(method="full", precision="bf16", seq_len=seq,
                                         device="cuda"))
    per_layer = est.profile(1).per_token_layers
    h, a = 768, 12
    assert len(per_layer) == 12
    assert all(b == 34 * h + 5 * a * seq + 2 * 8 for b in per_layer)  # 2 LNs x (mean, rstd)


def test_precisions_bytes_per_param():
    spec = load_spec("llama-2-7b")
    n = estimate(spec, EstimateConfig(method="full")).params["total"]
    per = {}
    for p in ("fp32", "bf16", "bf16-mixed", "amp-bf16"):
        b = estimate(spec, EstimateConfig(method="full", precision=p, batch_size=1)).bytes
        per[p] = (b["weights"], b["master_weights"], b["gradients"])
    # weights also hold the rotary-frequency buffers (a few hundred bytes)
    assert per["fp32"] == pytest.approx((4 * n, 0, 4 * n), rel=1e-6)
    assert per["bf16"] == pytest.approx((2 * n, 0, 2 * n), rel=1e-6)
    assert per["bf16-mixed"] == pytest.approx((2 * n, 4 * n, 2 * n), rel=1e-6)
    assert per["amp-bf16"] == pytest.approx((4 * n, 0, 4 * n), rel=1e-6)  # + cast copies
    lora = estimate(spec, EstimateConfig(method="lora", precision="amp-bf16", batch_size=1))
    assert lora.bytes["weights"] >= 4 * n  # `loralab train` keeps an fp32 base
