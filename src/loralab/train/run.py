"""``run_training``: config -> data -> model -> loop -> run directory.

Everything that can be wrong with the input is checked before the run
directory is created; artifacts (adapter/, model/, metrics.json) are written
atomically by the main process only.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

from loralab.allocator import keep_freed_heap, prefer_huge_pages
from loralab.config import TrainConfig, config_from_dict
from loralab.data.dataset import encode_splits, prepare_data, resolve_data_path
from loralab.data.encode import Encoded, encode_text_blocks
from loralab.data.tables import read_text_file
from loralab.errors import OS_ERRORS, LoralabError, os_errno
from loralab.io import atomic_dir, atomic_write_json, atomic_write_text, remove_stale_temps
from loralab.lora.dropout import use_fast_dropout
from loralab.lora.variants import is_mutated_init
from loralab.models import context_length
from loralab.train import distributed, rundir
from loralab.train.attention import use_fast_attention
from loralab.train.first_token import use_first_token_only
from loralab.train.loop import Loop, check_budget, device_multiple
from loralab.train.memory import (
    current_rss,
    mapped_checkpoint_rss,
    peak_process_memory,
    reset_peak,
    tensor_account,
)
from loralab.train.methods import load_for_method, quiet_transformers
from loralab.train.preflight import preflight_train


def note(text: str) -> None:
    """One line to stderr (warnings and notices; never the progress bar)."""
    print(text, file=sys.stderr, flush=True)


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        # bf16 autocast only where the GPU has bf16 units; fp32 on CPU, where bf16
        # matmuls without AMX run many times slower than fp32
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if mp == "fp16" and not cuda:
        raise LoralabError("mixed_precision=fp16 needs a CUDA GPU. Use mixed_precision=no on CPU.")
    return Accelerator(cpu=not cuda, mixed_precision=mp,
                       **distributed.accelerator_kwargs(cfg, cuda))


def _resume_config(run_dir: Path, quiet: bool) -> TrainConfig:
    # a kill between atomic_dir's two renames left the checkpoint aside: put it back
    remove_stale_temps(run_dir, depth=0)
    saved = rundir.saved_config(run_dir)
    if saved is None:
        raise LoralabError(f"{run_dir} holds no loralab run (no config.yaml). "
                           "Give the run directory of an interrupted `loralab train`.")
    if (run_dir / "metrics.json").exists():
        raise LoralabError(f"the run in {run_dir} already finished (metrics.json exists). "
                           "Nothing to resume.")
    if not (run_dir / "checkpoint" / "trainer_state.json").exists():
        raise LoralabError(f"the run in {run_dir} stopped before its first checkpoint. "
                           "Start it again with the same options and --overwrite.")
    cfg = config_from_dict(saved)
    cfg.output, cfg.quiet = str(run_dir), quiet or cfg.quiet
    return cfg


def _general_text(cfg: TrainConfig, tokenizer, length: int) -> Encoded | None:
    if cfg.task not in ("sft", "lm") or not cfg.general_text:
        return None
    text = read_text_file(resolve_data_path(cfg.general_text))
    enc = encode_text_blocks(tokenizer, text, length)
    keep = max(1, cfg.general_text_tokens // length)
    return Encoded(enc.input_ids[:keep], enc.labels[:keep])


def _start_dir(run_dir: Path, cfg: TrainConfig, prep, notes: list[str]) -> None:
    if cfg.overwrite:
        rundir.clear(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    if prep.label_map is not None:
        atomic_write_json(run_dir / "labels.json", prep.label_map.to_json())
    lines = [json.dumps({"step": 0, "message": text}) + "\n" for text in notes]
    (run_dir / "log.jsonl").write_text("".join(lines), encoding="utf-8")


def _data_facts(prep) -> list[str]:
    """What a score can be read against, not warnings: the test size (the 95 %
    half-width of an accuracy near 50 % is 1.96 * sqrt(0.25 / n)) and the class
    balance of the training data. The report shows these words too."""
    n, facts = prep.info.get("test_rows") or 0, []
    what = "rows" if prep.task == "classify" else "records"
    if n == 0 and prep.info.get("eval_rows"):
        facts.append(f"no test split: quality is measured on the eval split "
                     f"({prep.info['eval_rows']} {what}).")
    elif prep.task == "classify" and n < 10_000:
        facts.append(f"the test split has {n} rows: an accuracy near 50% is known to about "
                     f"±{98 / n ** 0.5:.1f} pt (95%); smaller differences are noise.")
    elif n < 200:
        facts.append(f"the test split has {n} {what}: its perplexity is a rough figure.")
    if prep.task == "classify":
        counts = {lab: prep.train.labels.count(lab) for lab in prep.label_map.labels}
        total = max(sum(counts.values()), 1)
        shown = sorted(counts.items(), key=lambda kv: -kv[1])
        text = ", ".join(f"{lab} {c} ({100 * c / total:.0f}%)" for lab, c in shown[:6])
        more = f", {len(shown) - 6} more" if len(shown) > 6 else ""
        facts.append(f"class balance of the training data: {text}{more}.")
    return facts


def _data_notes(cfg: TrainConfig, prep, splits) -> list[str]:
    notes = list(prep.warnings)
    if splits.truncated:
        notes.append(f"{splits.truncated} rows longer than max_length={cfg.max_length} tokens "
                     "were truncated (raise --max-length to keep them whole).")
    if splits.prompt_cut:
        notes.append(f"{splits.prompt_cut} sft records had their prompt cut from the left to fit "
                     f"max_length={cfg.max_length} (template and response kept; "
                     "--truncation drop skips them instead).")
    if splits.dropped:
        notes.append(f"{splits.dropped} sft records had no response token left after truncation "
                     "and were skipped.")
    return notes


def run_training(cfg: TrainConfig, resume: str | Path | None = None) -> Path:
    """Train as ``cfg`` says (or continue the interrupted run in ``resume``);
    returns the run directory. Under torchrun/accelerate launch every process
    calls this; a process that fails stops them all (``failure_barrier``)."""
    with distributed.failure_barrier() as stop:
        return _run(cfg, resume, stop)


def _hidden_size(model: str) -> int | None:
    """The model's hidden size from its config.json alone; None where it cannot
    be read (loading the model reports why)."""
    from loralab.models import load_config

    try:
        return getattr(load_config(model), "hidden_size", None)
    except (LoralabError, OSError, ValueError):
        return None


def _run(cfg: TrainConfig, resume: str | Path | None, stop) -> Path:
    from accelerate.utils import set_seed

    if resume is not None:
        cfg = _resume_config(Path(resume), cfg.quiet)
    cfg.resolve()
    # before torch's first CPU allocation, which fixes its choice
    prefer_huge_pages(cfg.micro_batch_tokens or cfg.batch_size * cfg.max_length,
                      _hidden_size(cfg.model))
    acc = make_accelerator(cfg)  # first: from here on a failing rank can tell the others
    backend_notes = distributed.adapt_to_backend(cfg, acc)
    prep = prepare_data(cfg)
    run_dir = Path(cfg.output) if cfg.output else _shared_default_output(cfg, acc)
    cfg.output = stop.run_dir = str(run_dir)
    if resume is None:
        rundir.check_output(run_dir, cfg)
    if acc.is_main_process:  # before the model loads: writable, room for the artifacts
        preflight_train(cfg, run_dir, len(prep.label_map.labels) if prep.label_map else 2,
                        resume is not None)
    acc.wait_for_everyone()
    reset_peak(acc.device.type)
    # what the process holds before the model loads (interpreter, libraries, the
    # data): the measured floor under the peak, named in the memory breakdown
    baseline = current_rss() if acc.device.type == "cpu" else None
    set_seed(cfg.seed)
    model, tok = load_for_method(cfg, acc.device.type, prep.label_map)
    if acc.device.type == "cpu":
        use_fast_dropout(model)  # the model's own dropout layers: same p, cheaper masks
        use_fast_attention(model)  # and attention dropout, where SDPA would take its math path
        keep_freed_heap()  # each micro-batch reuses the last one's pages
    use_first_token_only(model)  # a [CLS] head reads one position of the last layer
    distributed.fit_wrap_policy(acc, model)
    limit = context_length(model)
    length = min(cfg.max_length, limit) if limit else cfg.max_length
    splits = encode_splits(prep, tok, length)
    check_budget(cfg.micro_batch_tokens, splits.train.lengths, device_multiple(acc.device.type))
    general = _general_text(cfg, tok, length)
    notes = backend_notes + _data_notes(cfg, prep, splits)
    if length < cfg.max_length:
        notes.insert(0, f"max_length={cfg.max_length} exceeds the model's {limit} positions; "
                        f"sequences are cut to {limit} tokens.")
    if acc.is_main_process:
        if resume is None:
            _start_dir(run_dir, cfg, prep, prep.notes + _data_facts(prep) + notes)
        for text in prep.notes + _data_facts(prep):  # how the data was read, what it holds
            note(text)
        for text in notes:
            note(f"warning: {text}")
    acc.wait_for_everyone()
    distributed.check_shared_output(run_dir)
    labels = prep.label_map.labels if prep.label_map else None
    loop = Loop(model, cfg, splits.train, splits.eval, tok.pad_token_id, acc, run_dir, labels)
    before = loop.evaluate(general) if general is not None else None
    _fit(loop, run_dir, resume is not None)
    loop.restore_best()
    results = _final_eval(loop, splits, general, before)
    s = loop.state  # the tensor account is per process: taken before any gathering
    tensors = tensor_account(acc.unwrap_model(loop.model), s.gradients_bytes, s.optimizer_bytes)
    # sharded (FSDP) weights are gathered for the save; every rank takes part
    with distributed.whole_trainable(acc.unwrap_model(loop.model), keep=acc.is_main_process):
        if acc.is_main_process:
            with _keeping_checkpoint(loop, run_dir):
                mapped = mapped_checkpoint_rss() if acc.device.type == "cpu" else None
                _save(loop, cfg, tok, run_dir, prep, splits,
                      dict(results, tensors=tensors, baseline_rss=baseline, mapped_rss=mapped))
    acc.wait_for_everyone()
    return run_dir


def _shared_default_output(cfg: TrainConfig, acc) -> Path:
    """A timestamped dir, chosen by the main process so every rank agrees."""
    name = [str(rundir.default_output(cfg))]
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(name, from_process=0)
    return Path(name[0])


@contextlib.contextmanager
def _keeping_checkpoint(loop: Loop, run_dir: Path):
    """A write that fails (disk full, read-only remount) ends in one line; the
    temporary it was writing is gone (``atomic_dir``) and the last checkpoint kept."""
    try:
        yield
    except Exception as err:
        code = os_errno(err)
        if code not in OS_ERRORS:
            raise
        what, fix = OS_ERRORS[code]
        where = loop._last_checkpoint()
        hint = f"{fix} Then continue with `loralab train --resume {run_dir}`." \
            if "kept" in where else fix
        raise LoralabError(f"writing {getattr(err, 'filename', None) or run_dir} failed at "
                           f"step {loop.state.step}: {what}; {where}.", hint=hint) from err


def _fit(loop: Loop, run_dir: Path, resuming: bool) -> None:
    try:
        with _keeping_checkpoint(loop, run_dir):
            loop.fit(resume_from=run_dir if resuming else None)
    except KeyboardInterrupt:
        if loop.is_main:
            ck = run_dir / "checkpoint" / "trainer_state.json"
            where = (f"the last checkpoint is kept; continue with `loralab train --resume "
                     f"{run_dir}`") if ck.exists() else "no checkpoint had been written yet"
            note(f"interrupted at step {loop.state.step}: {where}.")
        raise


def _final_eval(loop: Loop, splits, general, before) -> dict:
    out = {"eval": loop.evaluate(splits.eval) if splits.eval is not None and len(splits.eval)
           else {},
           "test": loop.evaluate(splits.test) if splits.test is not None and len(splits.test)
           else {}}
    if general is not None:
        after = loop.evaluate(general)
        b, a = before["perplexity"], after["perplexity"]
        out["forgetting"] = {"before_ppl": b, "after_ppl": a, "delta": a - b,
                             "percent": 100.0 * (a - b) / b}
    return out


RESIDUAL_ADAPTER = "adapter-residual"  # PiSSA/OLoRA in the form they trained in


def _refuse_non_finite(model, loop: Loop) -> None:
    """No artifact with NaN weights: the last update can overflow them after a
    finite loss (an lr far too high on the final step), which no loss shows."""
    bad = [n for n, p in model.named_parameters()
           if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise loop.non_finite(f"the trained weights hold inf/nan ({bad[0]}, {len(bad)} "
                              "tensor(s))", loop.state.step)


def _save(loop: Loop, cfg: TrainConfig, tok, run_dir: Path, prep, splits, results) -> None:
    model = loop.acc.unwrap_model(loop.model)
    _refuse_non_finite(model, loop)
    labels = prep.label_map.labels if prep.label_map else None
    if cfg.method == "full":
        target = run_dir / "model"
        with atomic_dir(target) as tmp, quiet_transformers():
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    else:
        from loralab.lora import save_adapter

        target = run_dir / "adapter"
        meta = {"method": cfg.method, "labels": labels, "max_length": cfg.max_length}
        save_adapter(model, target, base_model_name_or_path=cfg.model, metadata=meta,
                     as_lora=True)
        if is_mutated_init(cfg.init_lora_weights):
            # adapter/ is the plain rank-2r LoRA on the original base (what merge,
            # eval, serve and vLLM load); this is the rank-r PiSSA/OLoRA form peft
            # reloads by redoing the init on the base (docs/variants.md)
            save_adapter(model, run_dir / RESIDUAL_ADAPTER, base_model_name_or_path=cfg.model,
                         metadata=meta)
    metrics = build_metrics(loop, cfg, model, results, rundir.dir_bytes(target), prep, splits)
    atomic_write_json(run_dir / "metrics.json", metrics)
    for leftover in ("checkpoint", "best"):
        rundir.clear(run_dir / leftover)


def build_metrics(loop: Loop, cfg: TrainConfig, model, results: dict, artifact_bytes: int,
                  prep, splits) -> dict:
    from loralab.lora import trainable_report

    s = loop.state
    report = trainable_report(model)
    peak = peak_process_memory(loop.acc.device.type)
    peak["tensors"] = results.get("tensors") or tensor_account(model, s.gradients_bytes,
                                                               s.optimizer_bytes)
    if results.get("baseline_rss") is not None:  # CPU: measured parts of what is not tensors
        peak["process_baseline_bytes"] = results["baseline_rss"]
        # VmHWM is the RSS the kernel last folded into its high-water mark (it does
        # so at unmaps, not continuously): it can read a few pages under an RSS
        # measured since the reset
        peak["peak_rss_bytes"] = max(peak["peak_rss_bytes"], results["baseline_rss"])
        peak["mapped_checkpoint_bytes"] = results.get("mapped_rss") or 0
    lora = cfg.method in ("lora", "qlora")
    step_seconds = max(s.train_seconds - s.eval_seconds, 1e-9)
    metrics = {
        "method": cfg.method, "task": cfg.task, "model": cfg.model,
        "rank": cfg.rank if lora else None, "alpha": cfg.alpha if lora else None,
        "targets": cfg.targets if lora else ("head" if cfg.method == "head" else "all"),
        "trainable_params": report["trainable"], "total_params": report["total"],
        "trainable_percent": report["percent"],
        "train_seconds": s.train_seconds, "eval_seconds": s.eval_seconds,
        "train_tokens": s.train_tokens, "tokens_per_second": s.train_tokens / step_seconds,
        "padded_tokens": s.padded_tokens, "micro_batch_tokens": cfg.micro_batch_tokens,
        "micro_batches_per_step": s.micro_batches / max(s.step, 1),
        "expected_train_seconds": s.expected_train_seconds,
        "seconds_per_step": s.seconds_per_step,
        "one_off_seconds": s.one_off_seconds,
        "steps": s.step, "epochs": s.step / loop.steps_per_epoch,
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "world_size": loop.world, "lr": cfg.lr, "seed": cfg.seed,
        "global_batch_size": cfg.effective_batch(loop.world),
        "peak_memory": peak, "eval": results["eval"], "test": results["test"],
        "best_step": s.best_step, "best_metric": {cfg.metric: s.best_metric},
        "artifact_bytes": artifact_bytes, "loss_curve": s.loss_curve, "evals": s.evals,
        "data": dict(prep.info, truncated_rows=splits.truncated,
                     prompt_cut_rows=splits.prompt_cut, dropped_rows=splits.dropped,
                     # the caveats in the terminal's words, for the report
                     caveats=_data_facts(prep) + _data_notes(cfg, prep, splits)),
    }
    if "forgetting" in results:
        metrics["forgetting"] = results["forgetting"]
    return metrics
