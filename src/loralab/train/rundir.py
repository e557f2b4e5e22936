"""The run directory: where it goes, whether it may be (re)used, what it holds."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import yaml

from loralab.errors import LoralabError

# settings that change where or how a run reports, not what it computes
NON_IDENTITY = ("output", "overwrite", "quiet")


def default_output(cfg) -> Path:
    from loralab.models import model_display_name

    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{model_display_name(cfg.model)}-{cfg.task}-{cfg.method}-{stamp}"


def _identity(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in NON_IDENTITY}


def saved_config(run_dir: Path) -> dict | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def check_output(run_dir: Path, cfg) -> None:
    """Refuse a dir that holds anything, unless --overwrite; name the fix."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise LoralabError(f"output {run_dir} is a file. Choose another --output.")
    if not any(run_dir.iterdir()) or cfg.overwrite:
        return
    saved = saved_config(run_dir)
    if saved is None:
        raise LoralabError(f"output dir {run_dir} is not empty and holds no loralab run. "
                           "Choose another --output or pass --overwrite to replace it.")
    if _identity(saved) != _identity(cfg.to_dict()):
        diff = [k for k in _identity(cfg.to_dict()) if saved.get(k) != getattr(cfg, k)]
        raise LoralabError(
            f"output dir {run_dir} already holds a different run (differs in: "
            f"{', '.join(diff[:4]) or 'settings'}). Choose another --output or pass --overwrite.")
    if (run_dir / "metrics.json").exists():
        raise LoralabError(f"output dir {run_dir} already holds this finished run. "
                           "Pass --overwrite to train it again.")
    raise LoralabError(f"output dir {run_dir} holds an unfinished run of this config. "
                       f"Continue it with `loralab train --resume {run_dir}` or pass --overwrite.")


def clear(run_dir: Path) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
