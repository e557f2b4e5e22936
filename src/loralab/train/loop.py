"""The training loop on top of accelerate.

The same code runs in one process or under ``accelerate launch``/``torchrun``:
every rank computes the same seeded batch plan and takes its own slice of each
global batch; the loss of an optimizer step is the sum over all its examples
(classify) or response tokens (sft) divided by their global count, so gradient
accumulation and data parallelism give the same update as one big batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from loralab.data.batching import (
    PASS_COST_TOKENS,
    collate,
    count_targets,
    pack_by_tokens,
    padded_width,
    plan_steps,
    shard,
)
from loralab.data.encode import Encoded
from loralab.errors import LoralabError
from loralab.train import checkpoint as ckpt
from loralab.train.distributed import is_sharded, local_rows
from loralab.train.evaluator import Evaluator
from loralab.train.lm_loss import causal_lm_loss_sum, upcast
from loralab.train.memory import gradient_bytes, optimizer_bytes
from loralab.train.optim import make_optimizer, make_scheduler, trainable_parameters
from loralab.train.progress import Reporter, truncate_log


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch being trained
    step_in_epoch: int = 0  # optimizer steps done inside ``epoch``
    train_tokens: int = 0  # real (unpadded) tokens seen, all ranks
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    loss_curve: list = field(default_factory=list)  # [[step, loss], ...]
    evals: list = field(default_factory=list)  # [[step, {metric: value}], ...]
    best_metric: float | None = None
    best_step: int | None = None
    gradients_bytes: int = 0
    optimizer_bytes: int = 0
    world: int = 1  # processes: a resumed run must split its batches the same way
    # the logging window (loss sum and steps since the last log line): saved with
    # the checkpoint so a resumed run logs the same averages as an unbroken one
    window: list = field(default_factory=lambda: [0.0, 0])
    micro_batches: int = 0  # forward/backward passes run (this rank)
    expected_train_seconds: float | None = None  # forecast from the first timed steps
    seconds_per_step: float | None = None  # the rate that forecast used
    one_off_seconds: float | None = None  # the first steps' time beyond that rate
    padded_tokens: int = 0  # tokens in the padded micro-batches, all ranks


class Loop:
    """Owns the optimizer, schedule and checkpoints of one run."""

    def __init__(self, model, cfg, train: Encoded, eval_set: Encoded | None, pad_id: int,
                 accelerator, run_dir: Path | None, label_names: list[str] | None = None):
        self.cfg, self.acc, self.run_dir = cfg, accelerator, run_dir
        self.train_set, self.eval_set, self.pad_id = train, eval_set, pad_id
        self.labels = label_names
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        global_batch = cfg.batch_size * self.world
        micro_per_epoch = math.ceil(len(train) / global_batch)
        self.steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.warmup = int(cfg.warmup_ratio * self.total_steps)
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.lora_plus_ratio)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.scheduler = make_scheduler(self.optimizer, cfg.scheduler, self.warmup,
                                        self.total_steps)
        self.params = [p for _, p in trainable_parameters(self.model)]
        # the bare module the chunked LM loss may bypass the head of; FSDP keeps
        # the head sharded outside the root forward, so it keeps the plain loss
        self.inner = None if is_sharded(accelerator) else accelerator.unwrap_model(self.model)
        self.sparse_embeddings = [_DenseGrad(p) for p in _sparse_embeddings(
            self.acc.unwrap_model(self.model), self.world, accelerator.device.type)]
        self.state = LoopState(world=self.world)
        self._work_done = 0  # this process's work so far (``_work``), for the forecast
        self.multiple = device_multiple(accelerator.device.type)
        check_budget(cfg.micro_batch_tokens, train.lengths, self.multiple)
        self.evaluator = Evaluator(self.model, accelerator, pad_id, cfg.eval_batch_size,
                                   label_names)

    # ---- paths --------------------------------------------------------
    def _path(self, name: str) -> Path | None:
        return self.run_dir / name if self.run_dir is not None else None

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    # ---- loss ---------------------------------------------------------
    def loss_sum(self, batch: dict) -> torch.Tensor:
        """Summed cross-entropy of the batch (not averaged)."""
        labels = batch["labels"]
        if labels.ndim > 1:  # causal LM: the head only where there are labels, in chunks
            return causal_lm_loss_sum(self.model, batch, self.inner)
        logits = self.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits  # (B, C)
        return F.cross_entropy(upcast(logits), labels, reduction="sum")

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.acc.device, non_blocking=True) for k, v in batch.items()}

    # ---- one optimizer step ---------------------------------------------
    def train_step(self, micro: list[list[int]]) -> tuple[float, int]:
        """Forward/backward over the step's micro-batches; returns (loss, tokens)."""
        enc = self.train_set
        n_global = sum(count_targets(enc, idx) for idx in micro)  # same on every rank
        loss_total = torch.zeros((), dtype=torch.float64, device=self.acc.device)
        tokens = 0
        parts = self._micro_batches(micro)
        self._work_done += self._work(parts)
        padded = 0
        for j, (local, weight) in enumerate(parts):
            # weight 0: a rank left without a row still joins the gradient all-reduce
            tokens += sum(len(enc.input_ids[i]) for i in local) if weight else 0
            batch = self._to_device(collate(enc, local, self.pad_id, self.multiple))
            padded += batch["input_ids"].numel() if weight else 0
            sync = j == len(parts) - 1 or self.world == 1
            ctx = contextlib.nullcontext() if sync else self.acc.no_sync(self.model)
            with ctx, self.acc.autocast():
                loss_sum = self.loss_sum(batch) * weight
                # DDP averages gradients over ranks, so scale by world size
                self.acc.backward(loss_sum * (self.world / max(n_global, 1)))
            loss_total += loss_sum.detach()
        for dense in self.sparse_embeddings:  # one dense gradient per step, for AdamW
            dense.load()
        if self.cfg.max_grad_norm > 0 and self.sparse_embeddings:  # CPU, one process
            clip_grad_norm(self.params, self.cfg.max_grad_norm, self.sparse_embeddings)
        elif self.cfg.max_grad_norm > 0:
            self.acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if self.state.gradients_bytes == 0:
            self.state.gradients_bytes = gradient_bytes(self.model)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.state.optimizer_bytes == 0:
            self.state.optimizer_bytes = optimizer_bytes(self.optimizer)
        loss_total = self.acc.reduce(loss_total, reduction="sum") if self.world > 1 else loss_total
        tokens, padded = self._reduce_ints(tokens, padded)
        self.state.micro_batches += len(parts)
        self.state.padded_tokens += padded
        return loss_total.item() / max(n_global, 1), tokens

    def _micro_batches(self, micro: list[list[int]]) -> list[tuple[list[int], float]]:
        """This rank's micro-batches of one step, as (rows, loss weight).

        With a token budget the rank's rows of the whole step are packed anew
        (``pack_by_tokens``); without one, each planned micro-batch is kept.
        DDP reduces once per step whatever the count; sharded weights (FSDP)
        are gathered in every forward, so there every rank runs the largest
        rank's count, the extra passes on one row with weight 0."""
        budget = self.cfg.micro_batch_tokens
        if not budget:
            return [local_rows(idx, self.rank, self.world) for idx in micro]

        def packed(rank: int) -> list[list[int]]:
            own = [i for idx in micro for i in shard(idx, rank, self.world)]
            return pack_by_tokens(own, self.train_set.lengths, budget, self.multiple,
                                  max_passes=len(micro))

        plan = [(rows, 1.0) for rows in packed(self.rank)]
        count = max(len(plan), 1)
        if self.world > 1 and self.inner is None:  # sharded
            count = max(count, *(len(packed(r)) for r in range(self.world)))
        return plan + [(micro[0][:1], 0.0)] * (count - len(plan))

    def _work(self, parts: list[tuple[list[int], float]]) -> int:
        """What this rank's passes of a step cost, in tokens: padded tokens plus
        PASS_COST_TOKENS per pass (the cost ``pack_by_tokens`` minimises)."""
        lengths = self.train_set.lengths
        return sum(PASS_COST_TOKENS + len(rows) * padded_width(
            max(lengths[i] for i in rows), self.multiple) for rows, _ in parts if rows)

    def _reduce_ints(self, *values: int) -> tuple[int, ...]:
        if self.world == 1:
            return values
        t = torch.tensor(values, device=self.acc.device)
        return tuple(int(v) for v in self.acc.reduce(t, reduction="sum").tolist())

    def evaluate(self, enc: Encoded) -> dict:
        return self.evaluator.evaluate(enc)

    # ---- the run ---------------------------------------------------------
    def fit(self, resume_from: Path | None = None) -> LoopState:
        if resume_from is not None:
            self._resume(resume_from)
        reporter = Reporter(self._path("log.jsonl") if self.is_main else None, self.total_steps,
                            enabled=self.is_main and not self.cfg.quiet,
                            start_step=self.state.step)
        try:
            self._train(reporter)
        finally:
            reporter.close()
            for module in self.acc.unwrap_model(self.model).modules():
                if isinstance(module, torch.nn.Embedding) and module.sparse:
                    module.sparse = False  # the trained model behaves as loaded
        return self.state

    def _epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        return plan_steps(self.train_set.lengths, self.cfg.batch_size * self.world,
                          self.cfg.grad_accum, self.cfg.seed, epoch, self.cfg.group_by_length)

    def _train(self, reporter: Reporter) -> None:
        s, cfg = self.state, self.cfg
        t0 = time.perf_counter() - s.train_seconds
        window = self.window = _Window(*s.window)
        self.model.train()
        while s.step < self.total_steps:
            steps = self._epoch_steps = self._epoch_plan(s.epoch)
            for i in range(s.step_in_epoch, len(steps)):
                loss, tokens = self.train_step(steps[i])
                self._check_finite(loss, s.step + 1)
                s.step, s.step_in_epoch = s.step + 1, i + 1
                s.train_tokens += tokens
                window.add(loss, tokens)
                if s.step_in_epoch == len(steps):
                    s.epoch, s.step_in_epoch = s.epoch + 1, 0
                s.train_seconds = time.perf_counter() - t0
                self._forecast(reporter)
                record = None
                if s.step % cfg.log_every == 0 or s.step in (1, self.total_steps):
                    record = self._log_record(window, t0)
                reporter.step(s.step, record)
                if self._eval_due(s.step_in_epoch == 0):
                    t_eval = time.perf_counter()
                    self._eval_point(reporter)
                    self._save_checkpoint()
                    s.train_seconds = time.perf_counter() - t0
                    window.t += time.perf_counter() - t_eval  # tokens/s: training time only
                if s.step >= self.total_steps:
                    break

    # The first step pays one-off costs (allocator growth, kernel selection,
    # lazy imports), so the rate is timed over the next FORECAST_STEPS - 1.
    FORECAST_STEPS = 4

    def _forecast(self, reporter: Reporter) -> None:
        """Once, after the first few steps: the expected training time, printed
        before the user commits to the whole run, and kept for metrics.json.

        Steps grouped by length differ in cost (a step of long rows pads more
        tokens and takes more passes), so the timed steps give seconds per unit
        of work (``_work``), and the rest of the run is its planned work: the
        current epoch's remaining steps as planned, later steps at this epoch's
        mean. ``seconds_per_step`` is the rate for that mean step, and
        ``one_off_seconds`` what the steps before the timed ones took beyond
        their work at that rate (so a run of N steps takes about one-off +
        N x seconds_per_step)."""
        s, first = self.state, getattr(self, "_first_step", None)
        if s.expected_train_seconds is not None or s.step >= self.total_steps:
            return
        if first is None:
            self._first_step = (s.step, s.train_seconds, self._work_done)
            return
        done = s.step - first[0]
        if done < self.FORECAST_STEPS - 1:
            return
        rate = (s.train_seconds - first[1]) / max(self._work_done - first[2], 1)
        work = [self._work(self._micro_batches(step)) for step in self._epoch_steps]
        mean = sum(work) / max(len(work), 1)
        ahead = work[s.step_in_epoch:] if s.step_in_epoch else []
        ahead = ahead[:self.total_steps - s.step]
        later = self.total_steps - s.step - len(ahead)
        s.seconds_per_step = rate * mean
        s.one_off_seconds = max(0.0, first[1] - rate * first[2])
        s.expected_train_seconds = s.train_seconds + rate * (sum(ahead) + mean * later)
        if self.is_main and not self.cfg.quiet:
            reporter.note(f"expected training time: {_duration(s.expected_train_seconds)} for "
                          f"{self.total_steps} steps ({s.seconds_per_step:.2f} s/step, timed "
                          f"over steps {first[0] + 1}-{s.step}; evaluation and saving come "
                          "on top)")

    def _log_record(self, window: _Window, t0: float) -> dict:
        s = self.state
        loss, tps = window.flush()
        self._check_finite(float(loss), s.step)  # the window's mean: steps since the last line
        s.loss_curve.append([s.step, loss])
        return {"step": s.step, "epoch": round(s.step / self.steps_per_epoch, 4), "loss": loss,
                "lr": self.scheduler.get_last_lr()[0], "tokens_per_second": tps,
                "micro_batches_per_step": round(s.micro_batches / max(s.step, 1), 2),
                "padded_tokens": s.padded_tokens, "train_tokens": s.train_tokens,
                "elapsed": round(time.perf_counter() - t0, 3)}

    def _eval_due(self, epoch_end: bool) -> bool:
        step = self.state.step
        if step >= self.total_steps:
            return True
        if self.cfg.eval_every:
            return step % self.cfg.eval_every == 0
        return epoch_end

    def _eval_point(self, reporter: Reporter) -> None:
        s = self.state
        if self.eval_set is None or len(self.eval_set) == 0:
            return
        t = time.perf_counter()
        metrics = self.evaluate(self.eval_set)
        s.eval_seconds += time.perf_counter() - t
        short = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        s.evals.append([s.step, short])
        reporter.eval(s.step, metrics, round(s.step / self.steps_per_epoch, 4))
        value = float(metrics[self.cfg.metric])
        better = s.best_metric is None or (
            value > s.best_metric if self.cfg.metric_higher_is_better else value < s.best_metric)
        if better:
            s.best_metric, s.best_step = value, s.step
            if self.is_main and self.run_dir is not None and self.cfg.keep_best:
                with self._finite_save():
                    ckpt.save_weights(self.run_dir / "best", self.acc.unwrap_model(self.model))
        self.acc.wait_for_everyone()

    def _check_finite(self, loss: float, step: int) -> None:
        """Stop at a non-finite loss, before any checkpoint or artifact holds the
        weights that made it. The step's loss is already a host float (the one
        ``.item()`` per step in ``train_step``), so the check adds no device sync;
        a loss left on the device is checked when its log line takes it to the
        host (and checkpoints refuse non-finite weights in between)."""
        if isinstance(loss, torch.Tensor):
            return
        if not math.isfinite(loss):
            raise self.non_finite(f"training loss became {loss}", step)

    def non_finite(self, what: str, step: int) -> LoralabError:
        """The one line for a run that diverged at ``step``."""
        return LoralabError(
            f"{what} at step {step} (lr {self.cfg.lr:g}): the learning rate is likely too "
            f"high. Nothing of this step was saved; {self._last_checkpoint()}.",
            hint="Fix: lower --lr (e.g. by 10x) and train again with --overwrite.")

    @contextlib.contextmanager
    def _finite_save(self):
        try:
            yield
        except ckpt.NonFiniteWeights as err:
            raise self.non_finite(f"the weights hold inf/nan ({err.name})",
                                  self.state.step) from None

    def _last_checkpoint(self) -> str:
        path = self._path("checkpoint")
        if path is None or not (path / ckpt.STATE).is_file():
            return "no checkpoint had been written yet"
        return f"the last checkpoint (step {ckpt.saved_step(path)}) is kept in {path}"

    def _save_checkpoint(self) -> None:
        window = getattr(self, "window", None)
        if window is not None:
            self.state.window = window.saved()
        if self.cfg.save_checkpoints and self.run_dir is not None and self.is_main:
            with self._finite_save():
                ckpt.save_checkpoint(self.run_dir / "checkpoint",
                                     self.acc.unwrap_model(self.model), self.optimizer,
                                     self.scheduler, asdict(self.state))
        self.acc.wait_for_everyone()

    def _resume(self, run_dir: Path) -> None:
        saved = ckpt.load_checkpoint(run_dir / "checkpoint", self.acc.unwrap_model(self.model),
                                     self.optimizer, self.scheduler)
        self.state = LoopState(**saved)
        if self.state.world != self.world:
            raise LoralabError(
                f"the run in {run_dir} was trained by {self.state.world} process(es) and this "
                f"launch has {self.world}; batches would be split differently. Resume it with "
                f"{self.state.world} (e.g. `torchrun --nproc_per_node {self.state.world} -m "
                "loralab train --resume ...`).")
        if self.is_main:
            truncate_log(run_dir / "log.jsonl", self.state.step)

    def restore_best(self) -> bool:
        """Load the best evaluated weights if they are not the current ones."""
        s = self.state
        best = self.run_dir / "best" if self.run_dir is not None else None
        if not self.cfg.keep_best or best is None or s.best_step in (None, s.step):
            return False
        if not best.exists():
            return False
        ckpt.load_weights(best, self.acc.unwrap_model(self.model))
        return True


def _sparse_embeddings(model, world: int, device: str) -> list:
    """Word embeddings trained in full get sparse gradients, on one CPU process.

    A dense embedding gradient is a zeroed (vocab x hidden) tensor per
    micro-batch (47 MB for BERT's 30,522 x 384) plus a full-size add to
    accumulate it, though a batch touches a few hundred rows (the cost:
    BENCHMARKS.md, "CPU training changes: what each saved"). Sparse gradients
    accumulate only the rows used and are made dense once per optimizer step, before
    clipping, so AdamW (every row decays, as usual) sees the same gradient.
    Tied input/output embeddings get dense gradients from the output side
    anyway and are left alone, as are multi-process and GPU runs.
    """
    if world > 1 or device != "cpu" or not hasattr(model, "get_input_embeddings"):
        return []
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if type(emb) is not torch.nn.Embedding or not emb.weight.requires_grad:
        return []
    if out is not None and getattr(out, "weight", None) is emb.weight:
        return []
    emb.sparse = True
    return [emb.weight]


def clip_grad_norm(params: list, max_norm: float, sparse: list[_DenseGrad]) -> float:
    """``torch.nn.utils.clip_grad_norm_`` for a step whose embedding gradients
    came from sparse rows: their norm is taken over the rows written (the rest
    are zeros), and nothing is multiplied when the norm is within bounds (torch
    multiplies every gradient by 1.0). On minilm's 30,522 x 384 embedding that
    is two full passes over 47 MB saved per step. Returns the total norm."""
    rows = {id(d.param): d for d in sparse if d.holds_grad()}
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = [rows[id(p)].values.norm() if id(p) in rows else p.grad.norm() for p in grads]
    total = torch.linalg.vector_norm(torch.stack(norms)).item()
    coef = max_norm / (total + 1e-6)  # torch's epsilon
    if coef < 1.0:
        for p in grads:
            if id(p) in rows:
                rows[id(p)].scale_(coef)
            else:
                p.grad.mul_(coef)
    return total


class _DenseGrad:
    """The dense gradient of a sparse-gradient embedding, in one buffer kept
    across steps. A fresh (vocab x hidden) tensor per step costs more than the
    step's own rows: 47 MB of new pages to fault in and zero for minilm
    (BENCHMARKS.md, "CPU training changes: what each saved"). Here only the
    rows the previous step wrote are cleared."""

    def __init__(self, param: torch.Tensor):
        self.param, self.buffer, self.rows, self.values = param, None, None, None

    def load(self) -> None:
        """Replace the parameter's accumulated sparse gradient by the dense one."""
        grad = self.param.grad
        if grad is None or not grad.is_sparse:
            return
        grad = grad.coalesce()  # duplicate rows summed, as to_dense() would
        if self.buffer is None:
            self.buffer = torch.zeros_like(self.param)
        else:  # rows were set with the buffer
            self.buffer.index_fill_(0, self.rows, 0.0)
        self.rows, self.values = grad.indices()[0], grad.values()
        self.buffer.index_copy_(0, self.rows, self.values)
        self.param.grad = self.buffer

    def holds_grad(self) -> bool:
        """True if the parameter's gradient is this step's buffer."""
        return self.buffer is not None and self.param.grad is self.buffer

    def scale_(self, coef: float) -> None:
        """Multiply the gradient by ``coef`` (only its written rows are nonzero)."""
        self.values = self.values * coef
        self.buffer.index_copy_(0, self.rows, self.values)


class _Window:
    """Loss and throughput since the last log line."""

    def __init__(self, loss: float = 0.0, steps: int = 0, tokens: int = 0):
        self.loss, self.steps, self.tokens, self.t = loss, steps, tokens, time.perf_counter()

    def saved(self) -> list:
        """What a checkpoint keeps: the loss average's terms (tokens/s starts
        afresh with its clock on resume)."""
        return [self.loss, self.steps]

    def add(self, loss: float, tokens: int) -> None:
        self.loss, self.steps, self.tokens = self.loss + loss, self.steps + 1, self.tokens + tokens

    def flush(self) -> tuple[float, float]:
        now = time.perf_counter()
        out = (self.loss / max(self.steps, 1), self.tokens / max(now - self.t, 1e-9))
        self.loss, self.steps, self.tokens, self.t = 0.0, 0, 0, now
        return out


def device_multiple(device_type: str) -> int:
    """Padded lengths are rounded to this on the device (tensor-core tiles)."""
    return 8 if device_type == "cuda" else 1


def check_budget(budget: int, lengths: list[int], multiple: int) -> None:
    """Refuse a micro-batch token budget the longest training row cannot fit."""
    longest = max(lengths, default=0)
    width = padded_width(longest, multiple)
    if budget and width > budget:
        padded = f", padded to {width} on this device" if width != longest else ""
        raise LoralabError(
            f"--micro-batch-tokens {budget} is smaller than the longest training row "
            f"({longest} tokens{padded}), which could not run at all.",
            hint=f"Fix: raise --micro-batch-tokens to at least {width}, or lower "
            "--max-length (or pass --micro-batch-tokens 0 for fixed rows per micro-batch).")


def _duration(seconds: float) -> str:
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {sec:02d} s" if minutes else f"{sec} s"
