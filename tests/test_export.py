"""`loralab export --format gguf` on tiny models with smollm2's real BPE tokenizer:
the file read back by transformers' GGUF loader matches the merged model, the
Modelfile's template renders as the chat template does, bad input is refused
in one line with nothing written."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import cli
from tiny_models import randomize_adapters

pytestmark = pytest.mark.usefixtures("single_thread")

# 2 layers, hidden 64, 4 heads of 16 with 2 KV heads: GQA and the q/k permutation
# both exercised; initializer_range 0.2 gives peaked logits (no near-ties).
_COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "max_position_embeddings": 128, "initializer_range": 0.2}
# rows of 256 and 512: every matrix divides into K-quant blocks
_WIDE = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}
CONFIGS = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": True, "attention_bias": True}),
    "mistral": ("MistralConfig", {"tie_word_embeddings": False, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": False}),
    "gemma2": ("Gemma2Config", {"query_pre_attn_scalar": 16, "hidden_activation":
                                "gelu_pytorch_tanh"}),
}


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a tiny model.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def small_bpe():
    """A real byte-level BPE (GPT-2 / SmolLM2 style), trained on the built-in
    general text to 512 ids: the full tokenizer path at a 100th of smollm2's vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from loralab.data.dataset import resolve_data_path

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw.train([resolve_data_path("general_text")], trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                   pad_token="<|im_end|>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def tok():
    return small_bpe()


@pytest.fixture(scope="module")
def smollm_tok():
    from loralab.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def _perturb(model, seed: int) -> None:
    """Norms and biases off their init (ones / zeros), so Gemma's +1 and Qwen2's
    biases are exercised by the comparison."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)


def _snap_to_q8_0(model) -> None:
    """Matrices moved onto the Q8_0 grid (quantize, dequantize), so a q8_0 export
    is exact and any difference read back is a bug, not rounding: random tiny
    models have top-1 margins of ~0.05 that q8_0's own error (~0.3 here) flips."""
    import gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                grid = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q8), q8)
                p.copy_(torch.from_numpy(grid))


def save_tiny(root: Path, arch: str, tok, seed: int = 0) -> Path:
    import transformers

    out = root / arch
    if (out / "config.json").exists():
        return out
    arch, _, grid = arch.partition("-")
    cls_name, extra = CONFIGS[arch]
    common = {**_COMMON, **_WIDE} if grid == "wide" else _COMMON
    cfg = getattr(transformers, cls_name)(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **common, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    _perturb(model, seed)
    if grid == "q8grid":
        _snap_to_q8_0(model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("export-models")
    return lambda arch: save_tiny(root, arch, tok)


def _report(path: Path) -> dict:
    return json.loads(Path(f"{path}.json").read_text())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2"])
def test_f16_reads_back_with_equal_logits(models, arch, tmp_path, capsys):
    out = tmp_path / f"{arch}-f16.gguf"
    assert cli("export", "--model", models(arch), "--quant", "f16", "--output", out) == 0
    r = _report(out)["verify"]
    # top-1 and free-running greedy may part at a near-tie of a random model (logits
    # 0.02 apart); the q8grid test below checks greedy where rounding is nil
    assert r["passed"] and r["top1_agreement"] > 0.95
    # f16 weights: relative error <= 2^-11 per weight; logits here reach ~10-30
    assert r["max_abs_logit_diff"] < 2e-2 * max(1.0, r["logit_scale"])
    assert r["metadata_mismatches"] == []
    printed = capsys.readouterr().out
    assert "max |logit diff|" in printed and "perplexity on general text" in printed


def test_adapter_export_merges_then_reads_back_equal(models, tok, tmp_path, capsys):
    """An adapter merged (as `loralab merge` does), written at f16, read back."""
    from transformers import AutoModelForCausalLM

    from loralab.lora import LoRAConfig, inject_lora, save_adapter

    base = models("llama")
    model = AutoModelForCausalLM.from_pretrained(base)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj",
                                                            "o_proj"], task="sft"))
    randomize_adapters(model, std=0.2)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base),
                 metadata={"task": "sft", "base_model": str(base)})
    out = tmp_path / "out" / "tuned-f16.gguf"
    out.parent.mkdir()
    assert cli("export", "--adapter", tmp_path / "adapter", "--format", "gguf",
               "--quant", "f16", "--output", out) == 0
    report = _report(out)
    assert report["verify"]["passed"] and report["verify"]["top1_agreement"] > 0.95
    assert report["source"]["merge_max_abs_diff"] < 1e-4
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "Modelfile", "tuned-f16.gguf", "tuned-f16.gguf.json"]
    assert "merged" in capsys.readouterr().out


def _adapter(base: Path, out: Path, std: float = 0.2) -> Path:
    from transformers import AutoModelForCausalLM

    from loralab.lora import LoRAConfig, inject_lora, save_adapter

    model = AutoModelForCausalLM.from_pretrained(base)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], task="sft"))
    randomize_adapters(model, std=std)
    return save_adapter(model, out, base_model_name_or_path=str(base),
                        metadata={"task": "sft", "base_model": str(base)})


def test_lab_exports_its_best_run_and_reports_it(models, tmp_path):
    """`compare --export gguf`: the run with the lowest perplexity is exported,
    and the report shows its GGUF size and quality beside the adapter's."""
    from lab_fixtures import metrics

    from loralab.export.lab import export_best, read_export
    from loralab.lab.report import build_report

    rows = []
    for run, ppl in (("lora-r4", 4.0), ("lora-r8", 3.5)):
        _adapter(models("qwen3"), tmp_path / run / "adapter")
        row = metrics("lora", 4, task="sft", trainable=1000)
        row.update(run=run, status="ok", eval={"perplexity": ppl, "loss": math.log(ppl)})
        row.pop("test", None)
        rows.append(row)
    summary = export_best(tmp_path, rows, "f16", echo=lambda *a: None)
    assert summary["run"] == "lora-r8" and summary["passed"]
    assert Path(summary["file"]) == tmp_path / "export" / "lora-r8-f16.gguf"
    assert Path(summary["file"]).is_file() and read_export(tmp_path) == summary
    html = build_report(rows, {"export": summary, "title": "t"})
    assert "Export (GGUF)" in html and "lora-r8-f16.gguf" in html and "GGUF f16" in html


def test_q8_0_reads_back_greedy_equal(models, tmp_path):
    out = tmp_path / "m-q8_0.gguf"
    assert cli("export", "--model", models("qwen2-q8grid"), "--quant", "q8_0",
               "--output", out) == 0
    report = _report(out)
    r = report["verify"]
    assert r["passed"] and r["greedy_equal"] and r["top1_agreement"] == 1.0
    assert r["max_abs_logit_diff"] < 1e-3 * r["logit_scale"]  # on the grid: exact to rounding
    assert report["tensor_types"]["Q8_0"] > 0 and report["tensor_types"]["F32"] > 0
    assert 0 <= report["estimated_bytes"] - report["bytes"] < 0.02 * report["bytes"] + 8192


def test_written_metadata_and_tokenizer(models, tok, tmp_path):
    """What llama.cpp reads: arch keys, the BPE vocabulary and its special tokens."""
    import gguf

    out = tmp_path / "m.gguf"
    assert cli("export", "--model", models("llama"), "--quant", "q4_0", "--output", out) == 0
    reader = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in reader.fields.items()
         if not k.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                              "tokenizer.ggml.token_type"))}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
    assert f["llama.attention.head_count_kv"] == 2 and f["llama.rope.dimension_count"] == 16
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert f["tokenizer.chat_template"] == tok.chat_template
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(tok) and tokens[tok.eos_token_id] == tok.eos_token
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reads token_embd
    assert names["token_embd.weight"] == "Q8_0" and names["blk.0.attn_q.weight"] == "Q4_0"
    r = _report(out)["verify"]
    assert r["criterion"].startswith("perplexity") and r["ppl_gguf"] > 0


def _types(path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def test_q4_k_m_mixes_types_as_llama_quantize_and_reads_back(models, tmp_path):
    """Rows of 256: Q4_K throughout, Q6_K for the output (the tied embedding for
    Llama) and for attn_v / ffn_down of the layers llama.cpp gives more bits
    (of 2 layers: the last), F32 norms; read back, the perplexity is reported."""
    for arch, head in (("llama", "token_embd.weight"), ("qwen3", "output.weight")):
        out = tmp_path / f"{arch}.gguf"
        assert cli("export", "--model", models(f"{arch}-wide"), "--quant", "q4_k_m",
                   "--output", out) == 0
        types = _types(out)
        assert types[head] == "Q6_K"
        assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q6_K"
        assert types["blk.0.attn_v.weight"] == types["blk.0.ffn_down.weight"] == "Q4_K"
        assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == "Q4_K"
        assert types["blk.0.attn_norm.weight"] == "F32"
        if arch == "qwen3":
            assert types["token_embd.weight"] == "Q4_K"  # untied: the embedding is not the head
        report = _report(out)
        assert report["verify"]["passed"] and report["verify"]["ppl_gguf"] > 0
        assert report["verify"]["metadata_mismatches"] == []
        assert 0 <= report["estimated_bytes"] - report["bytes"] < 0.02 * report["bytes"] + 8192


def test_k_quants_fall_back_where_rows_do_not_divide_into_256(models, tmp_path):
    """Rows of 64 (and 128): llama.cpp's fallbacks, Q4_K -> Q5_0, Q6_K -> Q8_0."""
    out = tmp_path / "m.gguf"
    assert cli("export", "--model", models("llama"), "--quant", "q4_k_m", "--output", out) == 0
    types = _types(out)
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["blk.1.attn_v.weight"] == "Q8_0"
    assert _report(out)["verify"]["passed"]


def test_k_quants_cost_less_error_per_bit(models, tmp_path):
    """Same model, read back: q4_k_s beats q4_0 and q5_k_m beats q5_0 (same size or
    near it), q6_k beats q5_k_m: the blocks are written as llama.cpp reads them."""
    diffs = {}
    for quant in ("q4_0", "q4_k_s", "q5_0", "q5_k_m", "q6_k"):
        out = tmp_path / f"{quant}.gguf"
        assert cli("export", "--model", models("qwen3-wide"), "--quant", quant,
                   "--output", out) == 0
        diffs[quant] = _report(out)["verify"]["mean_abs_logit_diff"]
    assert diffs["q4_k_s"] < diffs["q4_0"] and diffs["q5_k_m"] < diffs["q5_0"]
    assert diffs["q6_k"] < diffs["q5_k_m"] < diffs["q4_k_s"]


def small_spm(prefix: bool = True):
    """A SentencePiece-style BPE with byte fallback, as Llama 2's and Mistral's
    tokenizer.json are: the 256 byte tokens in the base vocabulary, spaces as
    U+2581 with a prefix space (``prefix=False``: none, as Gemma's), BOS added,
    an alphabet of 50 characters so that other text falls back to bytes."""
    import json as _json

    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    from loralab.data.dataset import resolve_data_path

    specials = ["<unk>", "<s>", "</s>"]
    train = Tokenizer(models.BPE(unk_token="<unk>"))
    train.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    train.train([resolve_data_path("general_text")], trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, limit_alphabet=50))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in _json.loads(train.to_str())["model"]["merges"]]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for piece, _ in sorted(train.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    raw = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    space = [normalizers.Replace(" ", "\u2581")]
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581")] * prefix + space)
    raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    """(tokenizer, model dir) per architecture: Gemma's tokenizer adds no prefix space."""
    toks = {True: small_spm(), False: small_spm(prefix=False)}
    root = tmp_path_factory.mktemp("export-spm")

    def build(arch):
        tok = toks[arch != "gemma2"]
        return tok, save_tiny(root / arch, arch, tok)
    return build


# texts whose tokens transformers' GGUF reader rebuilds as llama.cpp does (its
# Metaspace differs from a Prepend normalizer on leading runs of spaces and after
# special tokens; llama.cpp's own test below covers those)
SPM_TEXTS = ["The quick brown fox jumps over the lazy dog, 42 times.",
             "naïve café, Zürich — 東京 🙂", "Tabs\tand\nnewlines\n"]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_sentencepiece_vocab_is_written_with_scores_bytes_and_prefix(spm_models, arch,
                                                                     tmp_path):
    """GGUF model 'llama': tokens, scores from the merge ranks, BYTE and UNKNOWN
    types, add_space_prefix; transformers rebuilds the merges from those scores
    and tokenizes as the original tokenizer does (byte fallback included)."""
    import gguf
    from transformers import AutoTokenizer

    tok, model_dir = spm_models(arch)
    out = tmp_path / f"{arch}.gguf"
    assert cli("export", "--model", model_dir, "--quant", "f16", "--output", out) == 0
    reader = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in reader.fields.items()
         if k in ("tokenizer.ggml.model", "tokenizer.ggml.add_space_prefix",
                  "tokenizer.ggml.bos_token_id", "tokenizer.ggml.unknown_token_id",
                  "tokenizer.ggml.add_bos_token")}
    assert f["tokenizer.ggml.model"] == "llama"
    assert f["tokenizer.ggml.add_space_prefix"] is (arch != "gemma2")
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.add_bos_token"] is True
    assert "tokenizer.ggml.merges" not in reader.fields
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    assert types[tok.convert_tokens_to_ids("<0x0A>")] == gguf.TokenType.BYTE
    assert types[tok.unk_token_id] == gguf.TokenType.UNKNOWN
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL
    assert len(scores) == len(tok) and max(scores) == 0.0
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    for text in SPM_TEXTS:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    assert _report(out)["verify"]["passed"]


def test_llama_permutation_is_what_the_reader_undoes():
    """Our q/k permutation inverted by transformers' reader gives the weights back."""
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from loralab.export.arch import permute_qk

    w = torch.randn(4 * 16, 64)
    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    back = proc.process(permute_qk(w, 4).numpy(), "blk.0.attn_q.weight").weights
    np.testing.assert_array_equal(back, w.numpy())


# -- Ollama Modelfile ---------------------------------------------------------


def _go_render(template: str, messages: list[dict]) -> str:
    """Evaluate the Go text/template subset the Modelfile uses: literal text,
    range over .Messages with $last, if / else if / else / end on .Role and $last."""
    parts = re.split(r"({{.*?}})", template)
    out, i = [], 0

    def run(start, msg, last, emit):
        j = start
        stack = []  # [taken_any, active]
        while j < len(parts):
            p = parts[j]
            j += 1
            if not p.startswith("{{"):
                if emit and all(a for _, a in stack):
                    out.append(p)
                continue
            act = p[2:-2].strip()
            if act.startswith("range"):
                end = None
                for k, m in enumerate(messages):
                    end = run(j, m, k == len(messages) - 1, emit and all(a for _, a in stack))
                j = end if end is not None else _skip(j)
            elif act.startswith("$last :="):
                continue
            elif act.startswith(("if ", "else if ")):
                cond = _cond(act.removeprefix("else ").removeprefix("if "), msg, last)
                if act.startswith("if "):
                    stack.append([cond, cond])
                else:
                    taken = stack[-1][0]
                    stack[-1] = [taken or cond, (not taken) and cond]
            elif act == "else":
                stack[-1] = [True, not stack[-1][0]]
            elif act == "end":
                if not stack:
                    return j
                stack.pop()
            elif act == ".Content":
                if emit and all(a for _, a in stack):
                    out.append(msg["content"])
            else:
                raise AssertionError(f"unexpected action {act!r}")
        return j

    def _skip(j):
        depth = 1
        while depth:
            act = parts[j][2:-2].strip() if parts[j].startswith("{{") else ""
            depth += act.startswith(("if ", "range")) - (act == "end")
            j += 1
        return j

    run(i, None, False, True)
    return "".join(out)


def _cond(expr: str, msg, last) -> bool:
    if expr == "$last":
        return last
    if expr == "not $last":
        return not last
    m = re.fullmatch(r'eq \.Role "(\w+)"', expr)
    assert m, expr
    return msg["role"] == m.group(1)


def _parse_modelfile(text: str) -> dict:
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.DOTALL)
    system = re.search(r'SYSTEM """(.*?)"""', text, re.DOTALL)
    return {"from": re.search(r"^FROM (.+)$", text, re.MULTILINE).group(1),
            "template": template and template.group(1), "system": system and system.group(1),
            "stop": re.findall(r'^PARAMETER stop "(.*)"$', text, re.MULTILINE)}


def _ollama_messages(mf: dict, conv: list[dict]) -> list[dict]:
    if mf["system"] and conv[0]["role"] != "system":
        return [{"role": "system", "content": mf["system"]}] + conv
    return conv


CHATML_CONVS = [
    [{"role": "user", "content": "What is LoRA?"}],
    [{"role": "system", "content": "Terse."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


def test_modelfile_template_renders_like_the_chat_template(smollm_tok):
    """SmolLM2's own ChatML template, with its default system prompt."""
    from loralab.export.modelfile import modelfile_text

    tok = smollm_tok
    text, info = modelfile_text("m.gguf", tok)
    mf = _parse_modelfile(text)
    assert mf["from"] == "./m.gguf" and mf["stop"] == ["<|im_end|>"] and info["template"]
    assert mf["system"].startswith("You are a helpful AI assistant named SmolLM")
    for conv in CHATML_CONVS:
        want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert _go_render(mf["template"], _ollama_messages(mf, conv)) == want


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
    "+ '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")


def test_llama3_style_template_translates(tmp_path):
    """A Llama-3-style template on a tokenizer with Llama 3's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from loralab.export.modelfile import modelfile_text

    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    vocab = {t: i for i, t in enumerate(specials + ["a", "b"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", additional_special_tokens=specials)
    fast.chat_template = LLAMA3_TEMPLATE
    text, info = modelfile_text("m.gguf", fast)
    mf = _parse_modelfile(text)
    assert info["template"] and mf["stop"] == ["<|eot_id|>"] and mf["system"] is None
    for conv in CHATML_CONVS:
        want = fast.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert _go_render(mf["template"], conv) == want  # BOS kept: this tokenizer adds none


def test_untranslatable_template_leaves_template_to_ollama(tok):
    """A template that folds the system prompt into the first user turn is not
    per-message: no TEMPLATE (Ollama then reads the GGUF's), stops still written."""
    import copy

    from loralab.export.modelfile import modelfile_text

    folded = copy.deepcopy(tok)
    folded.chat_template = (  # Mistral-style: the system text opens the first [INST]
        "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
        "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}"
        "{% endif %}{% for m in msgs %}{% if m['role'] == 'user' %}[INST] "
        "{% if loop.first and sys %}{{ sys }}\n\n{% endif %}{{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}")
    text, info = modelfile_text("m.gguf", folded)
    assert not info["template"] and "TEMPLATE" not in text
    assert 'PARAMETER stop "<|im_end|>"' in text


# -- bad input: one line, exit 2, nothing written ------------------------------


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_unsupported_quant_lists_the_supported(models, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert cli("export", "--model", models("llama"), "--quant", "q3_k_m", "--output", out) == 2
    err = _one_line_error(capsys)
    assert "cannot quantize Q3_K" in err and "q4_k_m" in err and "f16" in err
    assert cli("export", "--model", models("llama"), "--quant", "q3_z", "--output", out) == 2
    assert "unknown type" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture_names_the_supported(tmp_path, tok, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2,
                               n_positions=64)).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    assert cli("export", "--model", tmp_path / "gpt2", "--output", tmp_path / "g.gguf") == 2
    err = _one_line_error(capsys)
    assert "'gpt2'" in err and "llama" in err and "qwen3" in err and "gemma2" in err
    assert not (tmp_path / "g.gguf").exists()


def test_missing_output_dir_and_existing_file(models, tmp_path, capsys):
    assert cli("export", "--model", models("llama"), "--output",
               tmp_path / "nope" / "m.gguf") == 2
    assert "does not exist" in _one_line_error(capsys)
    (tmp_path / "m.gguf").write_text("keep")
    assert cli("export", "--model", models("llama"), "--output", tmp_path / "m.gguf") == 2
    assert "already exists" in _one_line_error(capsys)
    assert (tmp_path / "m.gguf").read_text() == "keep"


def test_not_enough_disk_refused_before_writing(models, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 20, 9 << 20, 1 << 20))
    assert cli("export", "--model", models("llama"), "--output", tmp_path / "m.gguf") == 2
    err = _one_line_error(capsys)
    assert "not enough disk" in err and "MB needed" in err
    assert list(tmp_path.iterdir()) == []


def test_adapter_that_does_not_fit_the_base(models, tok, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from loralab.lora import LoRAConfig, inject_lora, save_adapter

    model = AutoModelForCausalLM.from_pretrained(models("qwen3"))
    inject_lora(model, LoRAConfig(r=2, targets=["q_proj"], task="sft"))
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(models("qwen3")),
                 metadata={"task": "sft"})
    other = models("llama")  # same module names, other shapes? no: llama's q is 64x64 too
    bigger = tmp_path / "wide"
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=len(tok), **{**_COMMON, "hidden_size": 32,
                                                           "num_attention_heads": 2})
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(bigger)
    tok.save_pretrained(bigger)
    del other
    capsys.readouterr()
    assert cli("export", "--adapter", tmp_path / "adapter", "--base", bigger,
               "--output", tmp_path / "m.gguf") == 2
    assert "does not fit" in _one_line_error(capsys)
    assert not (tmp_path / "m.gguf").exists()


def test_pre_tokenizer_names_llama_cpp_knows():
    """llama.cpp needs the pre-tokenizer by name; read from the tokenizer's structure."""
    from loralab.export.vocab import _LLAMA3_SPLIT, _QWEN2_SPLIT, pre_tokenizer_name

    def seq(*steps):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": list(steps)}}

    byte_level = {"type": "ByteLevel", "use_regex": False}
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) \
        == "gpt-2"
    assert pre_tokenizer_name(seq({"type": "Digits", "individual_digits": True},
                                  {"type": "ByteLevel", "use_regex": True})) == "smollm"
    for regex, name in ((_LLAMA3_SPLIT, "llama-bpe"), (_QWEN2_SPLIT, "qwen2")):
        split = {"type": "Split", "pattern": {"Regex": regex}}
        assert pre_tokenizer_name(seq(split, byte_level)) == name
    with pytest.warns(UserWarning, match="unrecognised pre-tokenizer"):
        assert pre_tokenizer_name(seq({"type": "Whitespace"})) == "default"


# -- llama.cpp itself, where llama-cpp-python is installed (not a dependency) --


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2"])
def test_llama_cpp_computes_the_same_logits(models, tok, arch, tmp_path):
    """The file in llama.cpp: same token ids as the HF tokenizer, logits equal
    to f16 rounding. This is what the metadata (head counts, key length, RoPE,
    softcaps, the Gemma norm +1, the q/k permutation) must get right."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"{arch}.gguf"
    assert cli("export", "--model", models(arch), "--quant", "f16", "--output", out) == 0
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, n_threads=1,
                          verbose=False)
    text = "The quick brown fox jumps over the lazy dog, 42 times."
    ids = tok(text)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])  # (T, V)
    model = AutoModelForCausalLM.from_pretrained(models(arch)).eval()
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - ours).max() < 2e-2 * np.abs(ours).max()


def test_llama_cpp_tokenizes_sentencepiece_vocab_as_hf(spm_models, tmp_path):
    """The SPM vocabulary in llama.cpp: the same ids as the HF tokenizer, also for
    runs of spaces, text after a special token and bytes outside the alphabet."""
    llama_cpp = pytest.importorskip("llama_cpp")

    tok, model_dir = spm_models("llama")
    out = tmp_path / "spm.gguf"
    assert cli("export", "--model", model_dir, "--quant", "f16", "--output", out) == 0
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=1, verbose=False)
    for text in SPM_TEXTS + ["  two  spaces", "Hello</s> world", " lead", "x\n\n  y"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == \
            tok(text)["input_ids"], text


@pytest.mark.parametrize("quant", ["q4_k_m", "q5_k_s", "q6_k"])
def test_llama_cpp_runs_k_quants_as_read_back(models, tok, quant, tmp_path):
    """A K-quant file in llama.cpp gives the logits of the dequantized weights
    transformers reads back (llama.cpp's CPU kernels also round the activations
    to 8 bits, hence the tolerance)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from loralab.export.verify import read_back

    base = models("qwen3-wide")
    out = tmp_path / f"{quant}.gguf"
    assert cli("export", "--model", base, "--quant", quant, "--output", out) == 0
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, n_threads=1,
                          verbose=False)
    ids = tok("The quick brown fox jumps over the lazy dog, 42 times.")["input_ids"]
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    from transformers import AutoConfig

    model = read_back(out, AutoConfig.from_pretrained(base))
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - ours).max() < 5e-2 * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9


def test_compare_export_refused_before_any_training(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli("compare", "--export", "gguf", "--output", out) == 2  # tickets: classify
    assert "causal language models" in _one_line_error(capsys)
    assert cli("compare", "--data", "instructions", "--export", "gguf", "--export-quant",
               "q2_k", "--output", out) == 2
    assert "cannot quantize Q2_K" in _one_line_error(capsys)
    assert not out.exists()


def test_failed_check_deletes_a_float_file_and_warns_on_q8_0(models, tmp_path, capsys,
                                                              monkeypatch):
    """A float file that does not round-trip is a bug: deleted, exit 2. A q8_0 file
    under its bar is complete, only lossier: kept, with a warning."""
    from loralab.export import verify

    base = models("llama")
    capsys.readouterr()
    monkeypatch.setattr(verify, "judge", lambda result, quant: (False, "forced"))
    assert cli("export", "--model", base, "--quant", "f16",
               "--output", tmp_path / "a.gguf") == 2
    assert "failed its check (forced)" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []
    assert cli("export", "--model", models("llama"), "--quant", "q8_0",
               "--output", tmp_path / "b.gguf") == 0
    assert "warning: q8_0 missed its bar (forced)" in capsys.readouterr().out
    assert (tmp_path / "b.gguf").is_file() and not _report(tmp_path / "b.gguf")["verify"]["passed"]
