"""What a comparison or sweep will run: one resolved training config per run,
and a fingerprint that tells whether an output dir holds this comparison.

Nothing here loads a model or writes a file, so every bad option is reported
before the first run starts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from loralab.errors import LoralabError

# The lab's named methods: a training method plus the LoRA variant settings it
# sets (peft's names, as `loralab train` takes them). PiSSA uses the exact SVD:
# the lab's models are small, and the run's adapter-residual/ then reloads exactly.
VARIANTS = {
    "full": {"method": "full"},
    "head": {"method": "head"},
    "lora": {"method": "lora"},
    "qlora": {"method": "qlora"},
    "dora": {"method": "lora", "use_dora": True},  # Liu et al., 2024
    "qdora": {"method": "qlora", "use_dora": True},  # DoRA on the NF4 base
    "pissa": {"method": "lora", "init_lora_weights": "pissa"},  # Meng et al., 2024
    "olora": {"method": "lora", "init_lora_weights": "olora"},  # Büyükakyüz, 2024
    "rslora": {"method": "lora", "use_rslora": True},  # Kalajdzievski, 2023
    "lora-plus": {"method": "lora", "lora_plus_ratio": 16.0},  # Hayou et al., 2024: ratio 16
}
METHODS = tuple(VARIANTS)
DEFAULT_METHODS = {"classify": ("full", "head", "lora", "qlora"), "sft": ("full", "lora", "qlora"),
                   "lm": ("full", "lora", "qlora")}
# Methods with LoRA layers: run once per rank, and sweepable.
LORA_FAMILY = tuple(m for m, v in VARIANTS.items() if v["method"] in ("lora", "qlora"))
VARIANT_KEYS = ("use_dora", "init_lora_weights", "use_rslora", "lora_plus_ratio")
# Settings each run sets for itself; the rest of the config is shared by all runs.
RUN_KEYS = ("method", "rank", "alpha", "lr", "targets") + VARIANT_KEYS
# Settings the lab owns: where runs go and how they report.
LAB_KEYS = ("output", "overwrite", "quiet", "resume")


@dataclass(frozen=True)
class RunSpec:
    name: str
    overrides: dict  # a subset of RUN_KEYS


@dataclass
class Plan:
    kind: str  # "compare" or "sweep"
    output: Path
    runs: list[RunSpec]
    configs: dict  # run name -> resolved TrainConfig
    general_text: str | None = None
    generations: int = 0
    max_new_tokens: int = 64
    command: str = ""
    lab: dict = field(default_factory=dict)  # lab settings that change results
    # --tune-lr: run name -> the search that chose its learning rate (lab/lr_search.py)
    lr_search: dict = field(default_factory=dict)

    @property
    def task(self) -> str:
        return next(iter(self.configs.values())).task

    def run_config(self, name: str) -> dict:
        """The resolved config of one run, without where it is written."""
        data = self.configs[name].to_dict()
        return {k: v for k, v in data.items() if k not in LAB_KEYS}

    def shared(self) -> dict:
        first = self.run_config(self.runs[0].name)
        return {k: v for k, v in first.items() if k not in RUN_KEYS}

    def fingerprint(self) -> str:
        """Same fingerprint = same comparison: model, data (by content), split,
        seed, shared settings and the lab's own settings. The list of runs is
        left out, so asking for one more rank extends a comparison."""
        return digest({"kind": self.kind, "shared": essential(self.shared()),
                       "files": self.files(), "lab": self.lab})

    def files(self) -> dict:
        """Content hashes of the data files: an edited file is another comparison."""
        shared = self.shared()
        files = {k: file_digest(shared.get(k)) for k in ("data", "eval_data", "test_data")}
        files["general_text"] = file_digest(self.general_text)
        return files

    def run_fingerprint(self, name: str) -> str:
        return digest({"comparison": self.fingerprint(), "run": essential(self.run_config(name))})


def variant_of(cfg) -> str:
    """The lab's name for a run's method and variant settings (a TrainConfig or
    its dict): 'dora', 'qdora', 'pissa', ...; combinations joined by '+'."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    method = get("method")
    if method not in ("lora", "qlora"):
        return method
    parts = []
    if get("use_dora"):
        parts.append("qdora" if method == "qlora" else "dora")
    init = str(get("init_lora_weights") or "default")
    if init not in ("default", "true"):
        parts.append(init.split("_niter_")[0] if init.startswith("pissa") else init)
    if get("use_rslora"):
        parts.append("rslora")
    if get("lora_plus_ratio"):
        parts.append("lora-plus")
    if method == "qlora" and not get("use_dora"):
        parts.insert(0, "qlora")
    return "+".join(parts) or method


def essential(settings: dict) -> dict:
    """The settings that decide what runs compute, unset ones (None, False,
    empty) left out: a release that adds an option, off by default, keeps
    earlier comparisons and their finished runs valid."""
    return {k: v for k, v in settings.items()
            if not (v is None or v is False or (isinstance(v, (str, dict, list)) and not v))}


def differing(a: dict, b: dict) -> list[str]:
    ea, eb = essential(a), essential(b)
    return sorted(k for k in set(ea) | set(eb) if ea.get(k) != eb.get(k))


def digest(obj) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_digest(path: str | None) -> str | None:
    """Content hash of a data file or directory (a ``save_to_disk`` dataset: every
    file under it, by relative path and content; built-in names resolved), None
    if there is nothing on disk (a hub dataset id)."""
    if not path:
        return None
    from loralab.data.dataset import resolve_data_path

    resolved = Path(resolve_data_path(path))
    if resolved.is_file():
        files = [(None, resolved)]
    elif resolved.is_dir():
        files = sorted((p.relative_to(resolved).as_posix(), p) for p in resolved.rglob("*")
                       if p.is_file() and not p.name.startswith("."))
    else:
        return None
    h = hashlib.sha256()
    for rel, file in files:
        if resolved.is_dir():  # a lone file hashes as before: cached comparisons stay valid
            h.update(rel.encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def parse_train_args(args: list[str] | tuple[str, ...]) -> dict:
    """Training options passed through: ``--grad-accum 2``, ``--no-group-by-length``,
    ``--lr=1e-4`` or ``lr=1e-4`` -> ``{"grad_accum": "2", ...}`` (typed later)."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, value = arg[2:], None
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            elif key.startswith("no-"):
                key, value = key[3:], "false"
            else:
                value = "true"
        elif "=" in arg:
            key, value = arg.split("=", 1)
        else:
            raise LoralabError(f"cannot read {arg!r}: pass training options as --name value "
                               "or name=value (e.g. --grad-accum 2).")
        out[key.strip().replace("-", "_")] = _number(value)
        i += 1
    return out


def _number(value: str):
    """'1e-3' -> 0.001: YAML 1.1 reads a float without a dot as a string."""
    try:
        return int(value)
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        return value
    return number if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value


def check_passthrough(options: dict, owned: tuple[str, ...], kind: str) -> None:
    """Refuse training options the lab sets per run or controls itself."""
    hints = {"method": "--methods", "rank": "--ranks", "alpha": "--alphas", "lr": "--lrs",
             "targets": "--targets", "output": "--output", "overwrite": "--overwrite",
             **{k: "--methods (named variants: " + ", ".join(LORA_FAMILY) + ")"
                for k in VARIANT_KEYS}}
    for key in options:
        if key in owned or key in LAB_KEYS:
            flag = hints.get(key)
            fix = f"Use {kind}'s {flag} instead." if flag else f"{kind} sets it for every run."
            raise LoralabError(f"option {key!r} cannot be passed through to the runs. {fix}")


def split_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def parse_methods(text: str | None, default: tuple[str, ...]) -> list[str]:
    methods = split_list(text) or list(default)
    for m in methods:
        if m not in METHODS:
            raise LoralabError(f"unknown method {m!r}. Use a comma-separated list of: "
                               f"{', '.join(METHODS)} (e.g. --methods full,lora).")
    return list(dict.fromkeys(methods))


def parse_ranks(text: str | None, default: tuple[int, ...] = (8,)) -> list[int]:
    """'4,8,16' -> [4, 8, 16]; every rank a whole number >= 1."""
    items = split_list(text)
    if text is not None and not items:
        raise LoralabError("the rank list is empty. Pass ranks like --ranks 4,8,16.")
    ranks = []
    for item in items:
        try:
            rank = int(item)
        except ValueError:
            rank = None
        if rank is None or rank < 1:
            raise LoralabError(f"bad rank {item!r}: ranks are whole numbers >= 1. "
                               "Pass ranks like --ranks 4,8,16.")
        ranks.append(rank)
    return list(dict.fromkeys(ranks)) or list(default)


def check_general_text(path: str) -> str:
    """A readable, non-empty UTF-8 text file; returns its absolute path."""
    p = Path(path).expanduser()
    fix = "Pass --general-text with a plain-text file of ordinary prose."
    if not p.is_file():
        raise LoralabError(f"general text {p} not found or not a file. {fix}")
    raw = p.read_bytes()
    if not raw.strip():
        raise LoralabError(f"general text {p} is empty. {fix}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LoralabError(f"general text {p} is not UTF-8 text (byte 0x{raw[err.start]:02x} "
                           f"at offset {err.start}). {fix}") from None
    controls = sum(1 for c in text if ord(c) < 32 and c not in "\n\r\t\f")
    if "\x00" in text or controls > len(text) // 100:
        raise LoralabError(f"general text {p} looks binary, not text. {fix}")
    if len(text.split()) < 50:
        raise LoralabError(f"general text {p} has {len(text.split())} words: too few to "
                           f"measure perplexity. {fix}")
    return str(p.resolve())


def default_general_text() -> str:
    from loralab.data.dataset import resolve_data_path

    return check_general_text(resolve_data_path("general_text"))


def resolve_configs(shared: dict, runs: list[RunSpec]) -> dict:
    """One resolved, validated TrainConfig per run (no model is loaded)."""
    from loralab.config import build_config

    return {run.name: build_config(options={**shared, **run.overrides}) for run in runs}


def command_line(kind: str, options: list[tuple[str, object]], train_args) -> str:
    """The exact command that reproduces a plan, options spelled out."""
    import shlex

    parts = ["loralab", kind]
    for flag, value in options:
        if value is not None and value is not False:
            parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts + list(train_args))
