"""Evaluation: no gradients, batches sorted by length, results gathered across ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loralab.data.batching import collate, plan_batches
from loralab.data.encode import Encoded
from loralab.train.distributed import is_sharded, rank_batches
from loralab.train.lm_loss import row_loss_sums
from loralab.train.metrics import classification_metrics, lm_metrics


class Evaluator:
    def __init__(self, model, accelerator, pad_id: int, batch_size: int,
                 label_names: list[str] | None = None):
        # the bare module: a DDP wrapper would sync buffers on every forward, and
        # ranks run different numbers of eval batches
        self.model, self.acc, self.pad_id = accelerator.unwrap_model(model), accelerator, pad_id
        self.batch_size, self.labels = batch_size, label_names
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.multiple = 8 if accelerator.device.type == "cuda" else 1
        if label_names is not None:
            # scikit-learn's first import is slow (BENCHMARKS.md, "CPU training
            # changes: what each saved"): here, before training starts, not
            # inside the first eval and the run's train time
            import sklearn.metrics  # noqa: F401

    def evaluate(self, enc: Encoded) -> dict:
        """Metrics on ``enc`` (classification scores, or LM loss and perplexity)."""
        # inference_mode, except under sharding: FSDP2 keeps the gathered weight
        # buffers it makes in the first forward, and inference tensors cannot be
        # used by training later (no_grad there)
        grad_off = torch.no_grad if is_sharded(self.acc) else torch.inference_mode
        with grad_off():
            return self._evaluate(enc)

    def _evaluate(self, enc: Encoded) -> dict:
        from accelerate.utils import gather_object

        was_training = self.model.training
        self.model.eval()
        # longest first, so padding inside a batch is minimal
        batches = plan_batches(enc.lengths, self.batch_size, 0, 0, shuffle=False)
        rows = []
        for idx in rank_batches(batches, self.rank, self.world):  # same count on every rank
            batch = collate(enc, idx, self.pad_id, self.multiple)
            batch = {k: v.to(self.acc.device) for k, v in batch.items()}
            with self.acc.autocast():
                rows.extend(self._batch(batch, idx))
        rows = gather_object(rows) if self.world > 1 else rows
        self.model.train(was_training)
        return self._metrics(rows, enc)

    def _batch(self, batch: dict, idx: list[int]) -> list[tuple]:
        labels = batch["labels"]
        if labels.ndim > 1:  # causal LM: (index, loss sum, label count) per row
            # the training loss's labelled positions and chunks, no (B, T, V) logits;
            # FSDP keeps the head sharded outside the root forward: plain path
            inner = None if is_sharded(self.acc) else self.model
            sums, counts = row_loss_sums(self.model, batch, inner)  # (B,), (B,)
            return list(zip(idx, sums.tolist(), counts.tolist()))
        logits = self.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits.float()  # (B, C)
        losses = F.cross_entropy(logits, labels, reduction="none")  # (B,)
        return list(zip(idx, logits.argmax(-1).tolist(), losses.tolist()))

    def _metrics(self, rows: list[tuple], enc: Encoded) -> dict:
        rows = sorted({r[0]: r for r in rows}.values(), key=lambda r: r[0])
        if self.labels is not None:
            y_true = [enc.labels[i] for i, _, _ in rows]
            y_pred = [p for _, p, _ in rows]
            loss = sum(x for _, _, x in rows) / max(len(rows), 1)
            return classification_metrics(y_true, y_pred, self.labels, loss=loss)
        sums, counts = [s for _, s, _ in rows], [int(c) for _, _, c in rows]
        return lm_metrics(sum(sums), sum(counts), sums, counts)
