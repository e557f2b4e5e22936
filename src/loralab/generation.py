"""Text generation shared by ``loralab generate``, ``loralab serve`` and the
lab's side-by-side generations.

One decoding loop serves all three, so the server's answer for a prompt equals
the offline answer and the report's by construction: a batch of rows (each with
its own prompt, sampling parameters and adapter) is left-padded, prefilled once,
then decoded one token per step with a KV cache. Rows that finish leave the batch; the rest
go on. A batch of one is the offline path.

Greedy decoding is ``temperature == 0``; otherwise logits are divided by the
temperature, cut to the smallest nucleus whose mass reaches ``top_p`` (Holtzman
et al. 2019, "The Curious Case of Neural Text Degeneration") and sampled with a
per-row ``torch.Generator``, so a seed reproduces a sample whatever else shares
the batch.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from loralab.errors import LoralabError

# A route maps the adapter names of the rows in a forward pass (None = base)
# to a context manager that makes each row use its own adapter.
Route = Callable[[list], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy (argmax)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.max_tokens < 1:
            raise LoralabError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if not (math.isfinite(self.temperature) and math.isfinite(self.top_p)):
            raise LoralabError(f"temperature and top_p must be finite numbers, got "
                               f"{self.temperature} and {self.top_p}.")
        if self.temperature < 0:
            raise LoralabError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise LoralabError(f"top_p must be in (0, 1], got {self.top_p}.")
        if any(not s for s in self.stop):
            raise LoralabError("stop strings must not be empty.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TextStream:
    """Turns generated token ids into text deltas that are safe to emit.

    The whole generation is decoded at every step (a decoded token's text can
    depend on its neighbours: byte-level BPE splits characters, WordPiece glues
    ``##`` pieces). Text is held back while it ends in an incomplete character
    or could be the start of a stop string; a stop string ends the stream and
    is not part of the text (OpenAI semantics).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self.stopped = False

    def _decoded(self) -> str:
        return self.tokenizer.decode(
            self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        longest = max((len(s) for s in self.stop), default=1)
        for k in range(min(longest - 1, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                return k
        return 0

    def _find_stop(self, text: str) -> int:
        hits = [text.find(s, max(0, len(self.text) - len(s))) for s in self.stop]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else -1

    def push(self, token_id: int) -> str:
        """Add one token; return the newly emittable text (may be empty)."""
        self.ids.append(token_id)
        text = self._decoded()
        if not text.startswith(self.text):
            # A tokenizer rewrote earlier text; keep what was already emitted.
            text = self.text + text[len(self.text):]
        cut = self._find_stop(text)
        if cut >= 0:
            self.stopped = True
            return self._emit(text[:cut])
        if text.endswith("\ufffd"):
            return ""
        return self._emit(text[: len(text) - self._held_back(text)])

    def flush(self) -> str:
        """Emit whatever was held back (the stream ended without a stop string)."""
        if self.stopped:
            return ""
        text = self._decoded()
        if not text.startswith(self.text):
            text = self.text + text[len(self.text):]
        return self._emit(text)

    def _emit(self, text: str) -> str:
        delta = text[len(self.text):]
        self.text += delta
        return delta


@dataclass
class GenerationRequest:
    """One row of a batch: its prompt, how to sample, which adapter, and its
    result once finished. ``on_text`` receives each text delta as it appears."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    on_text: Callable[[str], None] | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Row:
    request: GenerationRequest
    stream: TextStream
    generator: torch.Generator | None


def context_length(model) -> int:
    """The number of positions the model can attend over (prompt + output)."""
    from loralab.models import context_length as stated

    return stated(model) or 2048  # a model that states no limit: a conservative window


def check_context(model, prompt_tokens: int, max_tokens: int) -> None:
    """Raise if the prompt plus ``max_tokens`` does not fit the context window."""
    limit = context_length(model)
    if prompt_tokens == 0:
        raise LoralabError("The prompt is empty after tokenization. Give some text.")
    if prompt_tokens + max_tokens > limit:
        raise LoralabError(
            f"The model's context length is {limit} tokens, but the prompt has "
            f"{prompt_tokens} tokens and max_tokens is {max_tokens}.",
            hint="Shorten the prompt or lower max_tokens.",
        )


def eos_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    ids = set()
    gen_cfg = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(gen_cfg, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _cache_kwarg(model) -> str:
    """``cache`` in transformers >= 5, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """Nucleus sampling for one row. logits: (V,)"""
    logits = logits.float()
    # shifted so the top logit is 0, and a temperature float32 can hold: a tiny one
    # gives -inf (greedy in effect), never inf - inf or 0 / 0 = nan
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)  # (V,)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)  # (V,), (V,)
        # keep a token while the mass before it is still below top_p
        keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < params.top_p
        keep[0] = True  # the most likely token always (a top_p under float32's range is 0)
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p, 1, generator=gen)  # (1,)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=gen))


class BatchDecoder:
    """Decodes a batch of requests step by step with one shared KV cache.

    ``route`` (optional) makes each row use its own adapter in every forward
    pass. Call :meth:`step` until it returns False; requests are updated in
    place and their ``on_text`` callbacks fire as text appears.
    """

    def __init__(self, model, tokenizer, requests: list[GenerationRequest], route=None):
        self.model = model
        self.route = route
        self.eos = eos_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.rows = [_Row(r, TextStream(tokenizer, r.params.stop), _generator(r.params))
                     for r in requests]
        self.cache = _new_cache(model)
        self.cache_kw = _cache_kwarg(model)
        self.device = next(model.parameters()).device  # the lab decodes on CUDA when present
        self.mask = self.positions = self.next_ids = None
        self.started = False

    def _forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        names = [row.request.adapter for row in self.rows]
        ctx = self.route(names) if self.route is not None else contextlib.nullcontext()
        with ctx, torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=True, logits_to_keep=1,
                             **{self.cache_kw: self.cache})
        return out.logits[:, -1, :]  # (B, V)

    def _prefill(self) -> torch.Tensor:
        prompts = [row.request.prompt_ids for row in self.rows]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
        for i, p in enumerate(prompts):  # left padding: every row ends at the same column
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0.. within each prompt
        self.mask, self.positions = mask, positions[:, -1:]
        return self._forward(ids, mask, positions)

    def _choose(self, logits: torch.Tensor) -> list[int]:
        """One token per row. logits: (B, V)"""
        greedy = logits.argmax(dim=-1).tolist()  # (B,)
        return [greedy[i] if row.generator is None
                else _sample(logits[i], row.request.params, row.generator)
                for i, row in enumerate(self.rows)]

    def _advance(self, row: _Row, token: int) -> None:
        req = row.request
        if req.cancelled:
            req.finish_reason = "cancelled"
            return
        if token in self.eos:
            req.finish_reason = "stop"
        else:
            req.token_ids.append(token)
            self._emit(row, row.stream.push(token))
            if row.stream.stopped:
                req.finish_reason = "stop"
            elif len(req.token_ids) >= req.params.max_tokens:
                req.finish_reason = "length"
        if req.done:
            self._emit(row, row.stream.flush())

    @staticmethod
    def _emit(row: _Row, delta: str) -> None:
        if delta:
            row.request.text += delta
            if row.request.on_text is not None:
                row.request.on_text(delta)

    def _prune(self, tokens: list[int]) -> list[int]:
        keep = [i for i, row in enumerate(self.rows) if not row.request.done]
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            if keep:
                self.cache.batch_select_indices(index)
            self.mask, self.positions = self.mask[index], self.positions[index]
            self.rows = [self.rows[i] for i in keep]
            tokens = [tokens[i] for i in keep]
        return tokens

    def step(self) -> bool:
        """Run one forward pass; return True while some rows are unfinished."""
        if not self.rows:
            return False
        if not self.started:
            self.started = True
            logits = self._prefill()
        else:
            ids = torch.tensor(self.next_ids, dtype=torch.long,
                               device=self.device).unsqueeze(1)  # (B, 1)
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            self.positions = self.positions + 1  # (B, 1)
            logits = self._forward(ids, self.mask, self.positions)
        tokens = self._choose(logits)
        for row, token in zip(self.rows, tokens):
            self._advance(row, token)
        self.next_ids = self._prune(tokens)
        return bool(self.rows)


def _generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator().manual_seed(seed)


def generate_batch(model, tokenizer, requests: list[GenerationRequest], route=None) -> None:
    """Run every request to completion in one batch (results are set in place)."""
    decoder = BatchDecoder(model, tokenizer, requests, route=route)
    while decoder.step():
        pass


def generate(model, tokenizer, prompt_ids: list[int], params: SamplingParams,
             adapter: str | None = None, route=None) -> GenerationRequest:
    """Generate for one prompt; the returned request holds text and finish_reason."""
    check_context(model, len(prompt_ids), params.max_tokens)
    request = GenerationRequest(list(prompt_ids), params, adapter)
    generate_batch(model, tokenizer, [request], route=route)
    return request


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids for a raw completion prompt, special tokens as the tokenizer adds them."""
    return list(tokenizer(prompt)["input_ids"])


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids for a conversation, opened for the assistant's answer.

    Formatted by ``loralab.data.prompts.build_chat_prompt`` and tokenized as
    training tokenizes prompts (``loralab.data.encode.encode_conversations``):
    a chat template writes its own BOS, a plain tokenizer adds its specials.
    """
    from loralab.data.prompts import build_chat_prompt, has_chat_template

    text = build_chat_prompt(tokenizer, messages)
    return list(tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"])


def load_for_generation(model_name: str | None, adapter_dir=None):
    """``(model, tokenizer)`` for a decoder, with the adapter at ``adapter_dir``
    (a PEFT dir or a run dir) loaded and active, on the base it was trained on
    (NF4 for a QLoRA adapter). ``model_name`` None: the adapter's own base."""
    from loralab.lora.adapters import (
        adapter_base,
        adapter_task,
        load_base_and_adapter,
        read_adapter_config,
    )
    from loralab.models import can_generate, load_config, load_model

    if adapter_dir is not None:
        config = read_adapter_config(adapter_dir)
        if adapter_task(config) == "classify":
            raise LoralabError(f"adapter '{adapter_dir}' is a classifier, not a generator.",
                               hint="Fix: use `loralab eval` or the server's /v1/classify for it.")
    name = model_name
    if name is None:
        name = adapter_base(config)
    if name is not None and not can_generate(load_config(name)):
        raise LoralabError(f"model '{name}' is not a text generator (an encoder or a "
                           "classifier checkpoint).",
                           hint="Fix: use a decoder model with its LM head (e.g. smollm2-135m).")
    if adapter_dir is None:
        model, tokenizer = load_model(name, "sft")
        return model.eval(), tokenizer
    model, tokenizer, _ = load_base_and_adapter(adapter_dir, model_name)
    return model, tokenizer


def complete(model, tokenizer, prompt: str, params: SamplingParams, chat: bool = False,
             on_text=None) -> GenerationRequest:
    """Generate for a raw prompt, or for one user message when ``chat``."""
    ids = (encode_chat(tokenizer, [{"role": "user", "content": prompt}]) if chat
           else encode_prompt(tokenizer, prompt))
    check_context(model, len(ids), params.max_tokens)
    request = GenerationRequest(ids, params, on_text=on_text)
    generate_batch(model, tokenizer, [request])
    return request
