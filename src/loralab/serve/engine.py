"""The served model and the one thread that runs it.

``ServedModel`` holds one base model and any number of named adapters on it.
Generation adapters live in the base's LoRA layers and are chosen per batch
row (``adapter_routing``), so requests for different adapters share a forward
pass. A classification adapter gets a sequence-classification head of its own,
built around the same backbone (no second copy of the base weights).

``Worker`` owns the model: every forward pass and every load or unload runs on
its thread, one after another, so adapters never change under a running
forward pass. Consecutive generation jobs are batched up to ``max_batch`` rows.
"""

from __future__ import annotations

import copy
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loralab.errors import LoralabError
from loralab.generation import BatchDecoder, GenerationRequest, context_length
from loralab.models import model_display_name
from loralab.serve.adapters import AdapterInfo


class ServedModel:
    """One base model in memory with named adapters loaded onto it."""

    def __init__(self, name: str, quantize: bool = False):
        from loralab.models import can_generate, load_config, load_model, quiet_transformers

        self.causal = can_generate(load_config(name))
        with quiet_transformers():
            self.model, self.tokenizer = load_model(name, "sft" if self.causal else "base",
                                                    quantize_4bit=quantize)
        self.model.eval()
        self.quantized = quantize  # NF4 base layers (QLoRA adapters run on these)
        self.name = model_display_name(name)
        self.context = context_length(self.model)
        self.classifiers: dict[str, torch.nn.Module] = {}  # adapter -> seq-cls model

    def _classifier(self, labels: tuple[str, ...]) -> torch.nn.Module:
        """A sequence-classification model sharing the base's backbone.

        Built on the meta device (no weights allocated), then the backbone is
        put in and only the small head is materialized; the adapter's saved
        head copy replaces it when the adapter loads.
        """
        from loralab.models import build_meta_model

        cfg = copy.deepcopy(self.model.config)
        cfg.id2label = dict(enumerate(labels))
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
        clf = build_meta_model(cfg, "classify", num_labels=len(labels))
        setattr(clf, clf.base_model_prefix, self.model.base_model)
        for module in clf.modules():
            if any(p.is_meta for p in module.parameters(recurse=False)):
                module.to_empty(device="cpu", recurse=False)
                for p in module.parameters(recurse=False):
                    torch.nn.init.zeros_(p)
        return clf.eval()

    def add_adapter(self, name: str, info: AdapterInfo) -> None:
        from loralab.lora import delete_adapter, load_adapter

        if info.task == "generate" and not self.causal:
            raise LoralabError(f"adapter '{name}' generates text, but {self.name} is an encoder.",
                               hint="Serve it with the decoder model it was trained on.")
        self._check_base(name, info)
        target = self._classifier(info.labels) if info.task == "classify" else self.model
        try:
            load_adapter(target, info.dir, adapter_name=name, config=info.config)
        except Exception as err:
            if name in getattr(target, "loralab_adapters", {}):
                delete_adapter(target, name)  # undo a half-done injection
            if isinstance(err, LoralabError):
                raise
            raise LoralabError(f"could not load adapter '{name}' from {info.dir}: {err}",
                               hint="Check that it is a LoRA adapter for this base model.") from err
        if info.task == "classify":
            self.classifiers[name] = target

    def _check_base(self, name: str, info) -> None:
        """An adapter runs on the base it was trained on: a QLoRA adapter on the
        NF4 weights (their quantization error is what it learned around), a
        float one on the float weights, exactly as ``eval`` and ``merge`` run it."""
        if info.quantized == self.quantized:
            return
        kinds = ("the NF4 base (QLoRA)", "the float base")
        trained, served = kinds if info.quantized else kinds[::-1]
        raise LoralabError(
            f"adapter '{name}' was trained on {trained}, but this server runs {served}.",
            hint="Fix: serve QLoRA and float adapters from separate servers "
            "(`loralab serve --quantize nf4` or `--quantize none`).")

    def remove_adapter(self, name: str) -> None:
        from loralab.lora import delete_adapter

        delete_adapter(self.classifiers.pop(name, self.model), name)

    def route(self, names: list[str | None]):
        from loralab.lora import adapter_routing

        return adapter_routing(self.model, names)

    def classify(self, name: str, inputs: list[list[int]]) -> list[list[float]]:
        """Class probabilities for each tokenized input, one row at a time (no
        padding, exactly as a single example is seen in training)."""
        from loralab.lora import adapter_routing

        clf = self.classifiers[name]
        out = []
        with adapter_routing(clf, [name]), torch.inference_mode():
            for ids in inputs:
                logits = clf(input_ids=torch.tensor([ids], dtype=torch.long)).logits  # (1, C)
                out.append(torch.softmax(logits.float(), dim=-1)[0].tolist())
        return out


@dataclass(eq=False)
class GenJob:
    """Rows of one HTTP request; ``done(error)`` runs on the worker when they finish."""

    requests: list[GenerationRequest]
    done: Callable[[BaseException | None], None]


@dataclass(eq=False)
class CallJob:
    """A function to run on the worker; ``done(result, error)`` gets its outcome."""

    fn: Callable[[], object]
    done: Callable[[object, BaseException | None], None]
    urgent: bool = False  # adapter load/unload: runs at the next batch boundary


@dataclass
class Worker:
    served: ServedModel
    max_batch: int = 8
    jobs: deque = field(default_factory=deque)
    cond: threading.Condition = field(default_factory=threading.Condition)
    stopping: bool = False
    batches: int = 0  # forward batches run (for /health and the load test)

    def __post_init__(self):
        self.thread = threading.Thread(target=self._loop, name="loralab-worker", daemon=True)
        self.thread.start()

    def submit(self, job) -> None:
        with self.cond:
            if self.stopping:
                raise LoralabError("the server is shutting down.")
            self.jobs.append(job)
            self.cond.notify()

    def pending(self) -> int:
        return len(self.jobs)

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=30)
        for job in list(self.jobs):
            _finish(job, LoralabError("the server shut down before this request ran."))
        self.jobs.clear()

    def _take(self) -> list | None:
        """The next job, or a run of consecutive generation jobs (up to max_batch rows)."""
        with self.cond:
            self.cond.wait_for(lambda: self.jobs or self.stopping)
            if self.stopping:
                return None
            urgent = next((j for j in self.jobs if isinstance(j, CallJob) and j.urgent), None)
            if urgent is not None:  # safe: no queued request can refer to the adapter
                self.jobs.remove(urgent)
                return [urgent]
            first = self.jobs.popleft()
            if not isinstance(first, GenJob):
                return [first]
            taken, rows = [first], len(first.requests)
            while (self.jobs and isinstance(self.jobs[0], GenJob)
                   and rows + len(self.jobs[0].requests) <= self.max_batch):
                rows += len(self.jobs[0].requests)
                taken.append(self.jobs.popleft())
            return taken

    def _loop(self) -> None:
        while (taken := self._take()) is not None:
            if isinstance(taken[0], CallJob):
                self._call(taken[0])
            else:
                self._generate(taken)

    def _call(self, job: CallJob) -> None:
        try:
            result = job.fn()
        except Exception as err:  # noqa: BLE001 - reported to the caller; the worker goes on
            job.done(None, err)
        else:
            job.done(result, None)

    def _generate(self, jobs: list[GenJob]) -> None:
        requests = [r for job in jobs for r in job.requests]
        error = None
        try:
            decoder = BatchDecoder(self.served.model, self.served.tokenizer, requests,
                                   route=self.served.route)
            while decoder.step():
                pass
            self.batches += 1
        except Exception as err:  # noqa: BLE001 - reported to every caller; the worker goes on
            traceback.print_exc()
            error = err
        for job in jobs:
            _finish(job, error)


def _finish(job, error) -> None:
    if isinstance(job, GenJob):
        job.done(error)
    else:
        job.done(None, error)
