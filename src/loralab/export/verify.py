"""Read a written GGUF back with transformers' GGUF loader (which dequantizes
every tensor) and compare it with the merged model it came from.

Three measures, on inputs fixed in advance so runs compare:
- max |logit difference| and top-1 agreement, teacher-forced on the merge
  check texts (``loralab.merge.CHECK_TEXTS``): where float formats must agree
  to rounding;
- greedy continuations of the same texts, token for token (reported; a real
  model's q8_0 continuation may part after a near-tie, see judge());
- perplexity on the general-text sample, both models: the number a user
  weighs when choosing 4-5 bit formats.

The read-back model is built from the merged model's config and only the
tensors come from the file, reshaped by the reader's own per-architecture
processors (which undo the Llama q/k permutation and Gemma's norm + 1 using
the head counts written in the file). transformers' reader does not parse
every key llama.cpp reads (Qwen3's head_dim, Gemma 2's softcaps), so the
written keys are checked against the config separately (``check_metadata``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from loralab.merge import CHECK_TEXTS

GREEDY_TOKENS = 16
PPL_TOKENS = 2048  # general-text tokens scored (blocks of PPL_BLOCK)
PPL_BLOCK = 256
Q8_MAX_PPL_CHANGE = 1.0  # percent; q8_0 measured +0.28% on SmolLM2-135M + LoRA


def _reader_config(config):
    """Mistral is written as llama.cpp's 'llama' (it has no Mistral architecture),
    and transformers' reader maps tensor names by the config's model_type: read
    it back as the Llama it is to llama.cpp (no sliding window, which llama.cpp's
    llama ignores too; the check texts are far shorter than any window)."""
    if config.model_type != "mistral":
        return config
    from transformers import LlamaConfig

    d = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "sliding_window")}
    return LlamaConfig(**{**d, "architectures": ["LlamaForCausalLM"]})


def read_back(path: Path, config):
    """The GGUF at ``path`` as a float32 transformers model."""
    import contextlib
    import io
    import warnings

    from transformers import AutoModelForCausalLM

    from loralab.models import quiet_transformers

    # the legacy reader draws its own tqdm bar on stderr; errors still raise
    with quiet_transformers(), warnings.catch_warnings(), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=str(path), config=_reader_config(config),
            dtype=torch.float32)
    model.hf_quantizer = None
    return model.eval()


@torch.inference_mode()
def _logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0].float()  # (T, V)


@torch.inference_mode()
def _greedy(model, ids: list[int], n: int, eos: set[int]) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                         dtype=torch.long), max_new_tokens=n, do_sample=False,
                         eos_token_id=sorted(eos) or None, pad_token_id=next(iter(eos), 0))
    return out[0, len(ids):].tolist()


def compare_logits(merged, exported, tok) -> dict:
    from loralab.generation import eos_token_ids

    eos = eos_token_ids(merged, tok)
    max_diff, abs_sum, agree, total, greedy_same, rows = 0.0, 0.0, 0, 0, 0, []
    for text in CHECK_TEXTS:
        ids = tok(text)["input_ids"]
        a, b = _logits(merged, ids), _logits(exported, ids)
        max_diff = max(max_diff, float((a - b).abs().max()))
        abs_sum += float((a - b).abs().mean(-1).sum())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ids)
        ga, gb = _greedy(merged, ids, GREEDY_TOKENS, eos), _greedy(exported, ids, GREEDY_TOKENS,
                                                                   eos)
        greedy_same += int(ga == gb)
        rows.append({"prompt": text, "merged": tok.decode(ga), "gguf": tok.decode(gb),
                     "equal": ga == gb})
    return {"max_abs_logit_diff": max_diff, "mean_abs_logit_diff": abs_sum / total,
            "logit_scale": float(_logits(merged, tok(CHECK_TEXTS[0])["input_ids"]).abs().max()),
            "top1_agreement": agree / total, "greedy_equal": greedy_same == len(CHECK_TEXTS),
            "greedy_prompts_equal": f"{greedy_same}/{len(CHECK_TEXTS)}", "greedy": rows}


@torch.inference_mode()
def perplexity(model, blocks: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for ids in blocks:
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1].float()  # (T-1, V)
        nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
        n += len(ids) - 1
    return math.exp(nll / n)


def general_blocks(tok) -> list[list[int]]:
    from loralab.data.dataset import resolve_data_path
    from loralab.data.encode import encode_text_blocks
    from loralab.data.tables import read_text_file

    text = read_text_file(resolve_data_path("general_text"))
    blocks = encode_text_blocks(tok, text, PPL_BLOCK).input_ids
    return blocks[: max(1, PPL_TOKENS // PPL_BLOCK)]


def _metadata(path: Path) -> dict:
    """Scalar keys of the file. transformers' header reader skips the token
    arrays (gguf's GGUFReader parses them element by element: ~8 s for 49k tokens)."""
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:  # older transformers
        import gguf

        reader = gguf.GGUFReader(str(path))
        return {k: f.contents() for k, f in reader.fields.items()}
    return read_gguf_metadata(str(path))[0]


def check_metadata(path: Path, config) -> list[str]:
    """Keys llama.cpp reads that differ from the config (empty when all agree)."""
    meta = _metadata(path)
    arch = meta["general.architecture"]
    want = {"block_count": config.num_hidden_layers, "embedding_length": config.hidden_size,
            "feed_forward_length": config.intermediate_size,
            "attention.head_count": config.num_attention_heads,
            "attention.head_count_kv": config.num_key_value_heads or config.num_attention_heads,
            "context_length": config.max_position_embeddings}
    if getattr(config, "head_dim", None):
        want["attention.key_length"] = config.head_dim
    bad = []
    for key, value in want.items():
        got = meta.get(f"{arch}.{key}")
        if got != value:
            bad.append(f"{arch}.{key}={got} (config: {value})")
    return bad


def verify(path: Path, merged, tok, quant: str) -> dict:
    """Every measure above, as one JSON-ready dict."""
    exported = read_back(path, merged.config)
    result = compare_logits(merged, exported, tok)
    blocks = general_blocks(tok)
    ppl_m, ppl_g = perplexity(merged, blocks), perplexity(exported, blocks)
    result.update(ppl_merged=ppl_m, ppl_gguf=ppl_g, ppl_change_pct=100 * (ppl_g / ppl_m - 1),
                  ppl_tokens=sum(len(b) for b in blocks), metadata_mismatches=check_metadata(
                      path, merged.config), quant=quant)
    result["passed"], result["criterion"] = judge(result, quant)
    return result


def judge(result: dict, quant: str) -> tuple[bool, str]:
    """The bar each format must clear (see docs/export.md)."""
    from loralab.export.gguf import LOSSLESS

    if result["metadata_mismatches"]:
        return False, "metadata matches the config"
    if quant in LOSSLESS:
        # f16 keeps ~11 significant bits, bf16 ~8: relative error per weight <= 2^-11 / 2^-8
        tol = {"f32": 1e-4, "f16": 1e-2, "bf16": 6e-2}[quant] * max(1.0, result["logit_scale"])
        # top-1 is reported, not required: two logits closer than the rounding may swap
        ok = result["max_abs_logit_diff"] <= tol
        return ok, f"logits equal to {quant} rounding (max diff <= {tol:.2g})"
    if quant == "q8_0":
        # Greedy continuations are reported, not required: on SmolLM2-135M + LoRA one
        # of three 16-token continuations parts at q8_0 (BENCHMARKS.md, "Export (GGUF)")
        ok = result["ppl_change_pct"] < Q8_MAX_PPL_CHANGE and result["top1_agreement"] >= 0.95
        return ok, (f"general-text perplexity within +{Q8_MAX_PPL_CHANGE:g}% and top-1 "
                    "agreement >= 95%")
    return True, "perplexity change reported (no pass bar at 4-5 bits)"
