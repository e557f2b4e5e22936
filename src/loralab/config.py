"""One typed configuration per training run, saved with every run directory.

Sources, later ones winning: the dataclass defaults, a YAML file, ``key=value``
overrides, then command-line options the user typed. ``resolve()`` fills the
values that depend on others (learning rate per method, alpha = 2r, task from
the data) so the ``config.yaml`` in a run dir is the exact recipe that made it.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loralab.errors import LoralabError

METHODS = ("full", "lora", "qlora", "head")
TASKS = ("classify", "sft")
SCHEDULERS = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "no", "bf16", "fp16")

# Per-method learning rates: full fine-tuning moves every weight, so it needs a
# small step (2e-5, BERT paper §A.3 range); LoRA's B starts at zero and its
# updates are scaled by alpha/r, so 1e-4..3e-4 is the usual range for
# instruction tuning (QLoRA paper App. B); a lone linear head on frozen
# features tolerates 1e-3. Classification with LoRA trains a fresh head too,
# on far fewer steps: at 2e-4 minilm LoRA r=8 ended 21 F1 points below full
# fine-tuning on the built-in tickets and 1.8 accuracy points below on 4,000
# SST-2 rows; at 1e-3 it ended 6 and 2 points above (BENCHMARKS.md). The LoRA
# paper's own GLUE runs use 4e-4..5e-4 for RoBERTa-base, where full
# fine-tuning uses 1e-5..3e-5.
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4, "head": 1e-3}
DEFAULT_LR_CLASSIFY = dict(DEFAULT_LR, lora=1e-3, qlora=1e-3)


def default_lr(method: str, task: str | None) -> float:
    table = DEFAULT_LR_CLASSIFY if task == "classify" else DEFAULT_LR
    return table.get(method, 2e-4)


BUILTIN_DATA = {"tickets": "classify", "instructions": "sft"}


@dataclass
class TrainConfig:
    """Everything that decides what a run computes (plus where it writes)."""

    model: str = "minilm"
    data: str = "tickets"
    task: str | None = None  # None: "sft" for instruction data, else "classify"
    method: str = "lora"
    output: str | None = None  # None: runs/<model>-<method>-<timestamp>
    eval_data: str | None = None
    test_data: str | None = None
    text_column: str = "text"  # a name, or a 0-based index for header-less files
    label_column: str = "label"
    eval_split: float = 0.1  # 80/10/10 when no eval/test files are given
    test_split: float = 0.1
    # LoRA: r=8, alpha=2r is the common starting point (LoRA paper §7.2 shows
    # small ranks suffice); targets "attention" = the paper's q,v (+k,o) choice.
    rank: int = 8
    alpha: float | None = None  # None: 2 * rank
    dropout: float = 0.0
    targets: str = "attention"  # "attention", "all-linear", "a,b,c" suffixes or "re:..."
    use_rslora: bool = False  # rsLoRA (Kalajdzievski, 2023): scaling alpha / sqrt(r)
    # LoRA variants under peft's names (method lora or qlora; see loralab.lora.variants)
    use_dora: bool = False  # DoRA (Liu et al., 2024); on qlora: QDoRA
    init_lora_weights: str = "default"  # default (peft's true), gaussian, pissa[_niter_K], olora
    lora_plus_ratio: float | None = None  # LoRA+ (Hayou et al., 2024): B's lr = ratio x lr; 16
    # optimisation
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    # per process; None: 16 classify, 8 sft (LM logits are B x T x vocab)
    batch_size: int | None = None
    grad_accum: int = 1
    # examples per optimizer step over all processes (batch x grad_accum x world size);
    # when set, the per-process batch is derived from it and must divide evenly
    global_batch_size: int | None = None
    fsdp: bool = False  # shard weights, gradients and optimizer state over GPUs (FSDP2)
    lr: float | None = None  # None: DEFAULT_LR[method]
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06  # RoBERTa paper's 6 % warmup
    scheduler: str = "linear"
    max_grad_norm: float = 1.0
    max_length: int | None = None  # None: 128 classify, 512 sft
    group_by_length: bool = True
    eval_every: int | None = None  # steps; None: once per epoch
    log_every: int = 10
    metric: str | None = None  # None: "f1" classify, "loss" sft
    keep_best: bool = True  # end with the best evaluated weights, not the last ones
    eval_batch_size: int | None = None  # None: 2 * batch_size (classify), batch_size (sft)
    seed: int = 42
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto: bf16 on GPUs that support it, fp32 on CPU
    compute_dtype: str = "auto"  # QLoRA compute dtype; auto: bf16 on GPU, fp32 on CPU
    general_text: str | None = None  # sft forgetting: perplexity before/after
    general_text_tokens: int = 16384  # first N tokens scored: same sample before and after
    save_checkpoints: bool = True  # resumable checkpoint after each eval
    quiet: bool = False
    overwrite: bool = False
    extra: dict = field(default_factory=dict)  # free-form notes kept with the run

    # ---- derived values -------------------------------------------------
    def resolve(self) -> TrainConfig:
        """Fill defaults that depend on other fields; validate; return self."""
        if self.task is None:
            self.task = infer_task(self.data)
        if self.alpha is None:
            self.alpha = float(2 * self.rank)
        if self.lr is None:
            self.lr = default_lr(self.method, self.task)
        if self.max_length is None:
            self.max_length = 128 if self.task == "classify" else 512
        if self.metric is None:
            self.metric = "f1" if self.task == "classify" else "loss"
        if self.global_batch_size is not None:
            from loralab.train.distributed import per_process_batch, world_size

            self.batch_size = per_process_batch(self.global_batch_size, self.grad_accum,
                                                self.batch_size, world_size())
        if self.batch_size is None:
            self.batch_size = 16 if self.task == "classify" else 8
        if self.eval_batch_size is None:
            self.eval_batch_size = self.batch_size * (2 if self.task == "classify" else 1)
        validate(self)
        return self

    @property
    def metric_higher_is_better(self) -> bool:
        return self.metric not in ("loss", "perplexity")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def infer_task(data: str) -> str:
    """``sft`` for instruction/chat data, else ``classify``."""
    if data in BUILTIN_DATA:
        return BUILTIN_DATA[data]
    suffix = Path(data).suffix.lower()
    if suffix in (".json", ".jsonl"):
        return _sniff_json_task(data)
    return "classify"


def _sniff_json_task(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            head = fh.read(4096)
    except OSError:
        return "classify"  # the data loader reports the missing file
    return "sft" if ('"instruction"' in head or '"messages"' in head) else "classify"


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise LoralabError(message)


def validate(cfg: TrainConfig) -> None:
    """Raise LoralabError naming the first bad value and how to fix it."""
    _check(cfg.method in METHODS,
           f"unknown method {cfg.method!r}. Use one of: {', '.join(METHODS)}.")
    _check(cfg.task in TASKS, f"unknown task {cfg.task!r}. Use one of: {', '.join(TASKS)}.")
    _check(not (cfg.method == "head" and cfg.task == "sft"),
           "method 'head' trains a classification head and does not fit task 'sft'. "
           "Use --method lora, qlora or full for instruction tuning.")
    _check(cfg.rank >= 1, f"rank must be >= 1 (got {cfg.rank}). Pass --rank 8, for example.")
    validate_variant(cfg)
    _check(cfg.alpha > 0, f"alpha must be > 0 (got {cfg.alpha}).")
    _check(0.0 <= cfg.dropout < 1.0, f"dropout must be in [0, 1) (got {cfg.dropout}).")
    _check(cfg.lr > 0, f"lr must be > 0 (got {cfg.lr}).")
    _check(cfg.epochs > 0 or (cfg.max_steps or 0) > 0,
           "nothing to train: set epochs > 0 or max_steps > 0.")
    _check(cfg.max_steps is None or cfg.max_steps > 0,
           f"max_steps must be > 0 (got {cfg.max_steps}).")
    for name in ("batch_size", "grad_accum", "log_every", "max_length", "eval_batch_size",
                 "general_text_tokens"):
        value = getattr(cfg, name)
        _check(value >= 1, f"{name} must be >= 1 (got {value}).")
    _check(cfg.eval_every is None or cfg.eval_every >= 1,
           f"eval_every must be >= 1 step (got {cfg.eval_every}).")
    _check(0.0 <= cfg.warmup_ratio < 1.0,
           f"warmup_ratio must be in [0, 1) (got {cfg.warmup_ratio}).")
    _check(cfg.weight_decay >= 0, f"weight_decay must be >= 0 (got {cfg.weight_decay}).")
    _check(cfg.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (got {cfg.max_grad_norm}).")
    _check(0.0 <= cfg.eval_split < 0.5 and 0.0 <= cfg.test_split < 0.5,
           "eval_split and test_split must each be in [0, 0.5).")
    _check(cfg.scheduler in SCHEDULERS,
           f"unknown scheduler {cfg.scheduler!r}. Use one of: {', '.join(SCHEDULERS)}.")
    _check(cfg.mixed_precision in PRECISIONS,
           f"unknown mixed_precision {cfg.mixed_precision!r}. Use one of: {', '.join(PRECISIONS)}.")
    _check(cfg.compute_dtype in ("auto", "float32", "bfloat16", "float16"),
           f"unknown compute_dtype {cfg.compute_dtype!r}. Use auto, float32, bfloat16 or float16.")
    valid_metrics = {"classify": ("f1", "accuracy", "precision", "recall", "loss"),
                     "sft": ("loss", "perplexity")}[cfg.task]
    _check(cfg.metric in valid_metrics,
           f"metric {cfg.metric!r} does not fit task {cfg.task!r}. "
           f"Use one of: {', '.join(valid_metrics)}.")


def validate_variant(cfg: TrainConfig) -> None:
    """DoRA, PiSSA/OLoRA and LoRA+ apply to LoRA layers: refuse them elsewhere."""
    init = str(cfg.init_lora_weights).strip().lower()
    cfg.init_lora_weights = "default" if init in ("true", "default") else init
    if cfg.init_lora_weights != "default":
        from loralab.lora.variants import INIT_HINT, is_mutated_init, parse_init

        _check(cfg.init_lora_weights != "false", "init_lora_weights false starts A and B "
               f"random, so training does not start from the base model. {INIT_HINT}")
        parse_init(cfg.init_lora_weights)
        mutated = is_mutated_init(cfg.init_lora_weights)
        _check(cfg.method == "lora" or not mutated and cfg.method == "qlora",
               f"init_lora_weights {cfg.init_lora_weights} needs method lora (got "
               f"{cfg.method}): " + ("PiSSA/OLoRA keep W - BA in the base weight, which a 4-bit "
                                     "base cannot hold without re-quantizing it." if mutated
                                     else "only LoRA layers have A and B to initialise."))
    lora = cfg.method in ("lora", "qlora")
    _check(lora or not cfg.use_dora, f"use_dora needs method lora or qlora (got {cfg.method}): "
           "DoRA rescales LoRA layers. Drop --use-dora or pass --method lora.")
    if cfg.lora_plus_ratio is not None:
        _check(cfg.lora_plus_ratio > 0, f"lora_plus_ratio must be > 0 (got "
               f"{cfg.lora_plus_ratio}); the LoRA+ paper uses 16.")
        _check(lora, f"lora_plus_ratio needs method lora or qlora (got {cfg.method}): it sets "
               "the learning rate of LoRA's B matrices.")


# ---- building a config from YAML + key=value + options ------------------

def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _field_types() -> dict[str, typing.Any]:
    return typing.get_type_hints(TrainConfig)


def coerce(name: str, value):
    """Convert ``value`` (YAML-parsed or a raw string) to the field's type."""
    hint = _field_types()[name]
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if isinstance(value, str) and value.strip().lower() in ("none", "null", "~", ""):
        value = None
    if value is None:
        if optional:
            return None
        raise LoralabError(
            f"{name} cannot be empty. Give it a value, e.g. {name}={_example(base)}.")
    if isinstance(value, str) and base is not str:
        value = yaml.safe_load(value)
    if name == "init_lora_weights" and isinstance(value, bool):  # peft's true / false
        value = "default" if value else "false"
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool)
        or isinstance(v, float) and v.is_integer(),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
        dict: lambda v: isinstance(v, dict),
    }[base](value)
    if not ok:
        raise LoralabError(
            f"bad value for {name}: {value!r} is not a {base.__name__}. "
            f"Write e.g. {name}={_example(base)}.")
    return value if base is dict else base(value)


def _example(base) -> str:
    return {int: "8", float: "0.0002", bool: "true", str: "text"}.get(base, "...")


def _check_keys(mapping: dict, source: str) -> None:
    names = set(field_names())
    unknown = [k for k in mapping if k.replace("-", "_") not in names]
    if unknown:
        raise LoralabError(
            f"unknown setting {unknown[0]!r} in {source}. "
            f"Valid settings: {', '.join(sorted(names))}.")


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LoralabError(f"config file {path} not found. Check the path.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LoralabError(f"config file {path} is not valid YAML ({first}). Fix the file.")
    if not isinstance(data, dict):
        raise LoralabError(f"config file {path} must hold a mapping of settings (key: value).")
    _check_keys(data, str(path))
    return {k.replace("-", "_"): v for k, v in data.items()}


def parse_overrides(items: typing.Iterable[str]) -> dict:
    """``["rank=16", "lr=1e-4"]`` -> ``{"rank": "16", "lr": "1e-4"}`` (coerced later)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise LoralabError(
                f"cannot read {item!r}: expected key=value (e.g. rank=16) or a .yaml file first.")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        _check_keys({key: value}, "overrides")
        out[key] = value
    return out


def build_config(yaml_path=None, overrides=None, options=None) -> TrainConfig:
    """Defaults < YAML file < key=value overrides < explicit options; resolved."""
    merged: dict = {}
    if yaml_path:
        merged.update(load_yaml(yaml_path))
    merged.update(parse_overrides(overrides or ()))
    merged.update({k: v for k, v in (options or {}).items()})
    _check_keys(merged, "options")
    values = {k: coerce(k, v) for k, v in merged.items()}
    return TrainConfig(**values).resolve()


def config_from_dict(data: dict) -> TrainConfig:
    """Rebuild a saved (already resolved) config, e.g. a run dir's config.yaml."""
    _check_keys(data, "config.yaml")
    return TrainConfig(**{k: coerce(k, v) for k, v in data.items()}).resolve()
