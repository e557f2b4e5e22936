"""One typed configuration per training run, saved with every run directory.

Sources, later ones winning: the dataclass defaults, a YAML file, ``key=value``
overrides, then command-line options the user typed. ``resolve()`` fills the
values that depend on others (learning rate per method, alpha = 2r, task from
the data) so the ``config.yaml`` in a run dir is the exact recipe that made it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loralab.errors import LoralabError

METHODS = ("full", "lora", "qlora", "head")
TASKS = ("classify", "sft", "lm")
TRUNCATIONS = ("left", "drop")
SCHEDULERS = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "no", "bf16", "fp16")

# Per-method learning rates: full fine-tuning moves every weight, so it needs a
# small step (2e-5, BERT paper §A.3 range); LoRA's B starts at zero and its
# updates are scaled by alpha/r, so 1e-4..3e-4 is the usual range for
# instruction tuning (QLoRA paper App. B); a lone linear head on frozen
# features tolerates 1e-3. Classification with LoRA trains a fresh head too,
# on far fewer steps, so it gets 1e-3: at 2e-4 it ended below full fine-tuning
# and at 1e-3 above it (BENCHMARKS.md, "The demo" and "Classification: minilm
# on SST-2"). The LoRA paper's own GLUE runs use 4e-4..5e-4 for RoBERTa-base,
# where full fine-tuning uses 1e-5..3e-5.
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
    # sft field mapping; None: detected (messages, prompt/completion, Alpaca, ...)
    prompt_field: str | None = None
    response_field: str | None = None
    messages_field: str | None = None
    # sft records longer than max_length: "left" cuts the prompt's content from the
    # left, template and response kept; "drop" cuts at max_length and skips a record
    # left with no response token (the rule before)
    truncation: str = "left"
    data_split: str | None = None  # a save_to_disk DatasetDict or a hub dataset: its split
    data_config: str | None = None  # a hub dataset's configuration name
    eval_split: float = 0.1  # 80/10/10 when no eval/test files are given
    test_split: float = 0.1
    # LoRA: r=8, alpha=2r is the common starting point (LoRA paper §7.2 shows
    # small ranks suffice); targets "attention" = the paper's q,v (+k,o) choice.
    rank: int = 8
    alpha: float | None = None  # None: 2 * rank
    dropout: float = 0.0
    targets: str = "attention"  # "attention", "all-linear", "a,b,c" suffixes or "re:..."
    # MoE experts' 3-D weights (peft's target_parameters): "experts" or "experts.down_proj,..."
    target_parameters: str | None = None
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
    # padded tokens per forward/backward pass: a step's rows, sorted by length, fill
    # micro-batches up to this budget (None: batch_size x max_length, the memory the
    # user accepted; 0: batch_size rows per micro-batch, however short)
    micro_batch_tokens: int | None = None
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
            self.task = infer_task(self.data, self)
        if self.alpha is None:
            self.alpha = float(2 * self.rank)
        if self.lr is None:
            self.lr = default_lr(self.method, self.task)
        if self.max_length is None:
            self.max_length = 128 if self.task == "classify" else 512
        if self.metric is None:
            self.metric = "f1" if self.task == "classify" else "loss"
        if self.global_batch_size is not None:
            self.batch_size = per_process_batch(self.global_batch_size, self.grad_accum,
                                                self.batch_size, world_size())
        if self.batch_size is None:
            self.batch_size = 16 if self.task == "classify" else 8
        if self.micro_batch_tokens is None:
            self.micro_batch_tokens = self.batch_size * self.max_length
        if self.eval_batch_size is None:
            self.eval_batch_size = self.batch_size * (2 if self.task == "classify" else 1)
        validate(self)
        return self

    def effective_batch(self, world: int | None = None) -> int:
        """Examples per optimizer step over all processes (batch x accum x world)."""
        return effective_batch(self.batch_size, self.grad_accum,
                               world_size() if world is None else world)

    def lora_config(self):
        """The engine's LoRAConfig for this run; building it checks its rules."""
        from loralab.lora import LoRAConfig

        if self.method == "head":  # no LoRA layer: only a trainable copy of the head
            return LoRAConfig(r=self.rank, alpha=self.alpha, task="classify")
        return LoRAConfig(r=self.rank, alpha=self.alpha, dropout=self.dropout,
                          targets=self.targets, use_rslora=self.use_rslora,
                          target_parameters=self.target_parameters, use_dora=self.use_dora,
                          init_lora_weights=self.init_lora_weights, task=self.task)

    @property
    def metric_higher_is_better(self) -> bool:
        return self.metric not in ("loss", "perplexity")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- batch arithmetic (litgpt keeps it on its TrainArgs too) -----------------

def world_size() -> int:
    """Processes in this run, as the launcher set them (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def effective_batch(batch_size: int, grad_accum: int, world: int) -> int:
    """Examples per optimizer step, over all processes."""
    return batch_size * grad_accum * world


def per_process_batch(global_batch: int, grad_accum: int, batch_size: int | None,
                      world: int) -> int:
    """The per-process micro-batch that makes ``global_batch`` per optimizer step.

    ``batch_size`` is what the user also gave (``None``: not given); it must agree.
    """
    per_step = max(grad_accum, 1) * world  # grad_accum < 1 is reported by validation
    if global_batch < 1:
        raise LoralabError(f"global_batch_size must be >= 1 (got {global_batch}).")
    if global_batch % per_step:
        lower = max(per_step, global_batch // per_step * per_step)
        raise LoralabError(
            f"global batch size {global_batch} cannot be split over {world} process(es) x "
            f"grad_accum {grad_accum}: it is not a multiple of {per_step}. Use a multiple of "
            f"{per_step} (e.g. {lower}), or launch a number of processes that divides it.")
    batch = global_batch // per_step
    if batch_size is not None and batch_size != batch:
        raise LoralabError(
            f"--batch-size {batch_size} and --global-batch-size {global_batch} disagree: "
            f"{batch_size} x grad_accum {grad_accum} x {world} process(es) = "
            f"{effective_batch(batch_size, grad_accum, world)}. Give only one of the two.")
    return batch


def infer_task(data: str, options=None) -> str:
    """``sft`` for instruction/chat data, ``lm`` for plain text or ``text``-only
    records, ``classify`` for tables with a label; ``options`` (a config or dict)
    supplies the field names and the split. What cannot be told asks for --task."""
    if data in BUILTIN_DATA:
        return BUILTIN_DATA[data]
    from loralab.data.fields import task_from_data

    return task_from_data(data, options)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise LoralabError(message)


def validate(cfg: TrainConfig) -> None:
    """Raise LoralabError naming the first bad value and how to fix it."""
    _check(cfg.method in METHODS,
           f"unknown method {cfg.method!r}. Use one of: {', '.join(METHODS)}.")
    _check(cfg.task in TASKS, f"unknown task {cfg.task!r}. Use one of: {', '.join(TASKS)}.")
    _check(not (cfg.method == "head" and cfg.task in ("sft", "lm")),
           f"method 'head' trains a classification head and does not fit task {cfg.task!r}. "
           "Use --method lora, qlora or full for instruction tuning.")
    check_numbers(cfg)
    validate_variant(cfg)
    cfg.lora_config()  # the engine's own rules for rank, alpha, dropout, targets
    _check(cfg.lr > 0, f"lr must be > 0 (got {cfg.lr}).")
    _check(cfg.epochs > 0 or (cfg.max_steps or 0) > 0,
           "nothing to train: set epochs > 0 or max_steps > 0.")
    _check(cfg.max_steps is None or cfg.max_steps > 0,
           f"max_steps must be > 0 (got {cfg.max_steps}).")
    for name in ("batch_size", "grad_accum", "log_every", "max_length", "eval_batch_size",
                 "general_text_tokens"):
        value = getattr(cfg, name)
        _check(value >= 1, f"{name} must be >= 1 (got {value}).")
    _check(cfg.micro_batch_tokens >= 0,
           f"micro_batch_tokens must be >= 0 (got {cfg.micro_batch_tokens}): a token budget "
           "per micro-batch, or 0 for batch_size rows each.")
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
                     "sft": ("loss", "perplexity"), "lm": ("loss", "perplexity")}[cfg.task]
    _check_data_options(cfg)
    _check(cfg.metric in valid_metrics,
           f"metric {cfg.metric!r} does not fit task {cfg.task!r}. "
           f"Use one of: {', '.join(valid_metrics)}.")


# Whole numbers beyond these are typos, and overflow torch's int32/int64 or
# numpy's seeding further down: refused here, with the field named.
INT_LIMIT = 2**31 - 1
SEED_LIMIT = 2**32 - 1  # numpy.random.seed's range (accelerate's set_seed seeds numpy)


def check_numbers(cfg: TrainConfig) -> None:
    """Every number finite, every whole number in range: before any rule that
    compares them (``nan > 0`` is False, and an inf lr trains to NaN weights)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        value, kinds = getattr(cfg, f.name), typing.get_args(hints[f.name]) or (hints[f.name],)
        if isinstance(value, bool) or value is None:
            continue
        if float in kinds and isinstance(value, (int, float)):
            _check(math.isfinite(value), f"{f.name} must be a finite number (got {value}). "
                   f"Pass a value such as {f.name}={_example(float)}.")
            _check(abs(value) <= 1e12, f"{f.name} {value:g} is out of range.")
        elif int in kinds and isinstance(value, int):
            limit = SEED_LIMIT if f.name == "seed" else INT_LIMIT
            low = 0 if f.name == "seed" else -INT_LIMIT
            _check(low <= value <= limit, f"{f.name} must be between {low} and {limit} "
                   f"(got {value}).")


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


def _check_data_options(cfg: TrainConfig) -> None:
    """Options given to a task they do not apply to say so (not silently ignored)."""
    _check(cfg.truncation in TRUNCATIONS,
           f"unknown truncation {cfg.truncation!r}. Use left (cut the prompt from the left) "
           "or drop (skip records whose prompt fills max_length).")
    sft_only = [f for f in ("prompt_field", "response_field", "messages_field")
                if getattr(cfg, f) is not None]
    _check(cfg.task == "sft" or not sft_only,
           f"--{sft_only[0].replace('_', '-') if sft_only else ''} does not apply to task "
           f"{cfg.task!r}: it names instruction data fields (sft).")
    table = [("--text-column", cfg.text_column != "text" and cfg.task == "sft"),
             ("--label-column", cfg.label_column != "label" and cfg.task in ("sft", "lm"))]
    bad = next((flag for flag, given in table if given), None)
    _check(bad is None, f"{bad} does not apply to task {cfg.task!r}"
           + (": sft reads prompt and response fields. Use --prompt-field/--response-field "
              "(or --messages-field)." if cfg.task == "sft" else ": lm data has no labels."))


# ---- building a config from YAML + key=value + options ------------------

def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _field_types() -> dict[str, typing.Any]:
    return typing.get_type_hints(TrainConfig)


NULLS = ("none", "null", "~", "")
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _bad(name: str, value, kind: str, example: str) -> LoralabError:
    return LoralabError(f"bad value for {name}: {value!r} is not {kind}. "
                        f"Write e.g. {name}={example}.")


def to_float(value, name: str = "value", *, finite: bool = True) -> float:
    """A number as users write it, in YAML, key=value or an option: 1e-4, 2E-5,
    .5, 1_000, 3 (YAML 1.1 reads 1e-4 as a string; Python's float() does not).
    Non-finite numbers (inf, nan) are refused unless ``finite`` is False."""
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text) if "__" not in text else None
        except ValueError:
            number = None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        number = None
    if number is None:
        raise _bad(name, value, "a number", "0.0002")
    if finite and not math.isfinite(number):
        raise LoralabError(f"{name} must be a finite number (got {value!r}). "
                           f"Write e.g. {name}=0.0002.")
    return number


def to_int(value, name: str = "value") -> int:
    """A whole number: 8, 1_000, 1e3, 8.0."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", "") if "__" not in value else "x", 10)
        except ValueError:
            pass
    try:
        number = to_float(value, name)
    except LoralabError:
        raise _bad(name, value, "a whole number", "8") from None
    if not number.is_integer():
        raise _bad(name, value, "a whole number", "8")
    return int(number)


def to_bool(value, name: str = "value") -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise _bad(name, value, "true or false", "true")


def to_list(value) -> list:
    """``[a, b]`` (YAML or its text), ``a,b`` or one item -> a list of strings."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                value = text[1:-1].split(",")
        else:
            value = text.split(",")
    if not isinstance(value, (list, tuple)):
        value = [value]
    return [str(v).strip() for v in value if str(v).strip()]


# String settings that also take a list (written back as "a,b").
LIST_FIELDS = ("targets", "target_parameters")


def coerce(name: str, value):
    """``value`` (YAML-parsed, a raw ``key=value`` string or an option) as the
    field's type: the one value parser for every way a setting arrives."""
    hint = _field_types()[name]
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if isinstance(value, str) and value.strip().lower() in NULLS:
        value = None
    if value is None:
        if optional:
            return None
        raise LoralabError(
            f"{name} cannot be empty. Give it a value, e.g. {name}={_example(base)}.")
    if name == "init_lora_weights" and isinstance(value, bool):  # peft's true / false
        value = "default" if value else "false"
    if base is bool:
        return to_bool(value, name)
    if base is int:
        return to_int(value, name)
    if base is float:
        return to_float(value, name, finite=False)  # validate() names the range
    if base is dict:
        value = yaml.safe_load(value) if isinstance(value, str) else value
        if not isinstance(value, dict):
            raise _bad(name, value, "a mapping", "{note: text}")
        return value
    if name in LIST_FIELDS and (isinstance(value, (list, tuple))
                                or str(value).strip().startswith("[")):
        return ",".join(to_list(value))
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _bad(name, value, "text", _example(base))
    return str(value)


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
