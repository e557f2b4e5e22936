"""Checks before anything heavy loads: the output can be written, and its disk
has room for what the run will write.

The bytes come from the model's config alone (the estimator's parameter counts
on the meta device; nothing is loaded) and the method:

- a resumable checkpoint holds the trainable weights and AdamW's two moments,
  all fp32: 12 bytes per trainable parameter; ``best/`` holds the weights again
  (4 bytes). Each is rewritten through a temporary sibling (``atomic_dir``), so
  while one is rewritten both copies exist.
- the artifact: full fine-tuning saves every weight (4 bytes: loralab trains in
  fp32 weights, autocast or not) plus the tokenizer; LoRA, QLoRA and head-only
  save the trainable tensors (the adapter).

The peak is the larger of a checkpoint rewrite during training and the final
save while checkpoint and best are still there (they go after metrics.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loralab.io import check_free_space, check_writable, remove_stale_temps

FP32 = 4
ADAMW_MOMENTS = 2
SLACK = 1 << 20  # log.jsonl, config.yaml, metrics.json, adapter_config.json
TOKENIZER = 16 << 20  # a full model's tokenizer and config files (Llama 3's: 9 MB)


@dataclass
class DiskPlan:
    peak: int  # bytes on disk at the run's fullest moment
    artifact: int  # bytes left once it finished (adapter/ or model/)
    what: str  # the artifacts, in words

    def transient(self) -> int:
        return self.peak - self.artifact


def disk_plan(cfg, num_labels: int = 2) -> DiskPlan | None:
    """What ``cfg``'s run writes; None when the estimator cannot size the model
    (an architecture it does not know): then only writability is checked."""
    try:
        params = _params(cfg.model, cfg.task, num_labels, cfg.method, cfg.rank, cfg.targets)
    except Exception:  # never block a run the estimator cannot size  # noqa: BLE001
        return None
    trainable, total = params["trainable"], params["total"]
    ckpt = (FP32 + ADAMW_MOMENTS * FP32) * trainable if cfg.save_checkpoints else 0
    best = FP32 * trainable if cfg.keep_best else 0
    if cfg.method == "full":
        artifact, name = FP32 * total + TOKENIZER, "model/"
    else:
        artifact, name = FP32 * trainable, "adapter/"
    peak = max(ckpt + best + max(ckpt, best), ckpt + best + artifact) + SLACK
    what = f"{name} and checkpoints ({trainable:,} trainable of {total:,} parameters)"
    return DiskPlan(int(peak * 1.05), artifact + SLACK, what)


_CACHE: dict = {}


def _params(model: str, task: str, num_labels: int, method: str, rank: int,
            targets: str) -> dict:
    key = (model, task, num_labels, method, rank, targets)
    if key not in _CACHE:
        from loralab.estimate.estimator import estimate
        from loralab.estimate.formula import EstimateConfig
        from loralab.estimate.spec import load_spec

        spec = load_spec(model, task, num_labels)
        est = estimate(spec, EstimateConfig(method=method, precision="fp32", device="cpu",
                                            rank=rank, targets=targets, overhead=False))
        _CACHE[key] = est.params
    return _CACHE[key]


def reclaimed(run_dir: Path, resuming: bool, overwrite: bool) -> int:
    """Bytes already in ``run_dir`` that the run replaces: all of it under
    --overwrite, a resumed run's checkpoint and best/."""
    from loralab.train.rundir import dir_bytes

    if not run_dir.is_dir() or not (resuming or overwrite):
        return 0
    if overwrite and not resuming:
        return dir_bytes(run_dir)
    return sum(dir_bytes(run_dir / d) for d in ("checkpoint", "best") if (run_dir / d).is_dir())


def preflight_train(cfg, run_dir: Path, num_labels: int, resuming: bool) -> None:
    """Refuse, before the model loads, a run that could not write its results;
    remove what killed runs left in ``run_dir``."""
    check_writable(run_dir)
    if run_dir.is_dir():
        remove_stale_temps(run_dir, depth=0)
    plan = disk_plan(cfg, num_labels)
    if plan is not None:
        need = plan.peak - reclaimed(run_dir, resuming, cfg.overwrite)
        check_free_space(run_dir, need, f"this run's {plan.what}")
