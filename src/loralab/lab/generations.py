"""Side-by-side generations: the same held-out prompts answered by the base
model and by each fine-tuned run, greedy, with the same token budget.

Prompts are formatted by ``loralab.data.prompts`` (through
``loralab.generation.encode_chat``), the module training uses, so every model
is asked in the format it was tuned on.
"""

from __future__ import annotations

from pathlib import Path

import torch


def held_out_prompts(cfg, n: int) -> list[dict]:
    """The first ``n`` conversations of the run's test split (else eval split):
    records no run trained on, split exactly as the trainer splits them."""
    from loralab.data.dataset import prepare_data

    prep = prepare_data(cfg)
    held_out = prep.test or prep.eval or []
    prompts = []
    for conv in held_out[:n]:
        *context, answer = conv
        user = next((m["content"] for m in reversed(context) if m["role"] == "user"), "")
        prompts.append({"prompt": user, "messages": context, "reference": answer["content"]})
    return prompts


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_job_model(job: dict):
    """(model, tokenizer) for a job: the base model, a full fine-tune's saved
    model, or the base with the run's adapter (NF4 for QLoRA), each loaded as
    ``loralab generate`` loads it."""
    from loralab.generation import load_for_generation

    method = job.get("method")
    if method is None:
        return load_for_generation(job["model"])
    run_dir = Path(job["run_dir"])
    if method == "full":
        return load_for_generation(str(run_dir / "model"))
    return load_for_generation(job["model"], run_dir / "adapter")


def generate(model, tokenizer, prompts: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy answers to ``prompts``, one batch, decoded by the loop ``loralab
    generate`` and ``serve`` use, so the report shows what those would answer."""
    from loralab.generation import (
        GenerationRequest,
        SamplingParams,
        check_context,
        encode_chat,
        generate_batch,
    )

    params = SamplingParams(max_tokens=max_new_tokens)  # temperature 0: greedy
    requests = [GenerationRequest(encode_chat(tokenizer, p["messages"]), params)
                for p in prompts]
    model.to(device()).eval()
    for request in requests:
        check_context(model, len(request.prompt_ids), max_new_tokens)
    generate_batch(model, tokenizer, requests)
    return [request.text.strip() for request in requests]
