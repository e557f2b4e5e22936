"""Several processes, one run: data parallelism (DDP) and sharding (FSDP, DeepSpeed).

loralab starts no process itself: ``torchrun`` or ``accelerate launch`` starts
one process per device and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
accelerate then opens the process group (gloo on CPU, NCCL on CUDA) and wraps
the model. This module holds what is specific to running several processes:

- the batch arithmetic (``--batch-size`` is per process; the global batch of
  one optimizer step is batch x grad_accum x world size),
- the FSDP plugin behind ``--fsdp`` and the checks that refuse what cannot run,
- the equal shares of work that keep every rank in step with the others
  (a rank that skips a collective stalls all of them),
- whole (gathered) copies of sharded trainable weights for saving,
- the failure barrier: a rank that fails makes every rank stop, and rank 0
  says which one failed and why.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from loralab.config import world_size
from loralab.errors import LoralabError

FAILURE_KEY = "loralab/failure/{rank}"
# seconds a rank that got SIGTERM from the launcher may still take to report
# and clean up before it exits anyway (torchrun itself sends SIGKILL after 30 s)
STOP_GRACE_S = 10.0
# seconds rank 0 waits for the failing rank's message to reach the store
REPORT_WAIT_S = 5.0


# ---- who am I ----------------------------------------------------------------

def process_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


# ---- backends: DDP, FSDP, DeepSpeed -------------------------------------------------

def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def sharding_requested(cfg) -> str | None:
    """"fsdp" or "deepspeed" when the option or an accelerate config asks for it."""
    if getattr(cfg, "fsdp", False) or _env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return None


def check_backend(cfg, cuda: bool) -> None:
    """Refuse, before anything is loaded, what accelerate would not run as asked."""
    kind = sharding_requested(cfg)
    if kind is None:
        return
    if getattr(cfg, "fsdp", False) and _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise LoralabError("--fsdp and a DeepSpeed accelerate config both ask to shard the "
                           "model. Choose one: drop --fsdp or launch without DeepSpeed.")
    name = {"fsdp": "FSDP", "deepspeed": "DeepSpeed ZeRO"}[kind]
    if not cuda:
        # accelerate shards only across GPUs: on CPU it would quietly run plain DDP
        raise LoralabError(
            f"{name} shards the model across CUDA GPUs and none is visible here. "
            "Drop --fsdp / the sharding accelerate config: plain data parallelism "
            "(`torchrun --nproc_per_node N -m loralab train ...`) runs on CPU over gloo.")
    if cfg.method == "qlora":
        raise LoralabError(
            f"QLoRA does not run under {name} here (4-bit weights are not sharded). "
            "Launch without sharding: QLoRA runs under plain DDP, one 4-bit copy per GPU.")
    if kind == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise LoralabError("the accelerate config asks for DeepSpeed, which is not "
                               "installed. Run `pip install deepspeed` or use --fsdp.") from None
        if cfg.grad_accum != 1:
            raise LoralabError(
                "under DeepSpeed the accumulation steps come from the DeepSpeed config. "
                "Set gradient_accumulation_steps there and leave --grad-accum at 1.")


def fsdp_plugin():
    """FSDP2 with full sharding, one unit per transformer block.

    ``reshard_after_forward=True`` is full shard (ZeRO-3: weights, gradients and
    optimizer state all split over the ranks); the wrap policy follows the
    model's own ``_no_split_modules`` (its decoder/encoder layer class), as
    accelerate's transformer-based policy does. FSDP2 shards each parameter on
    its own, so frozen base weights and trainable LoRA weights may share a unit.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True,
        auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False, activation_checkpointing=False)


def accelerator_kwargs(cfg, cuda: bool) -> dict:
    """Extra ``Accelerator`` arguments for the run (checked first)."""
    check_backend(cfg, cuda)
    if getattr(cfg, "fsdp", False):
        return {"fsdp_plugin": fsdp_plugin()}
    return {}


def fit_wrap_policy(accelerator, model: torch.nn.Module) -> None:
    """One FSDP unit per block class in ``model._no_split_modules``, leaving out
    a class that holds the input embedding (BERT's ``BertEmbeddings``):
    accelerate gives the embedding a unit of its own, and an embedding already
    sharded inside another unit cannot be sharded again."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.distributed_type.name != "FSDP" or plugin is None:
        return
    if plugin.transformer_cls_names_to_wrap:
        return  # an accelerate config named them: keep its choice
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    names = set(getattr(model, "_no_split_modules", None) or [])
    keep = {type(m).__name__ for m in model.modules() if type(m).__name__ in names
            and not (embed is not None and any(c is embed for c in m.modules()))}
    plugin.transformer_cls_names_to_wrap = sorted(keep)


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _fit_deepspeed(cfg, accelerator) -> None:
    """Refuse what the loop cannot honour; fill the config's ``auto`` values
    from loralab's options (accelerate infers them only from dataloaders)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if plugin.zero_stage == 3:
        raise LoralabError(
            "DeepSpeed ZeRO stage 3 partitions the weights in a way loralab cannot save "
            "from. Use ZeRO stage 1 or 2 in the accelerate config, or --fsdp for full sharding.")
    if "optimizer" in ds or "scheduler" in ds:
        raise LoralabError("the DeepSpeed config names an optimizer or scheduler; loralab makes "
                           "AdamW and its schedule itself. Remove those sections.")
    gas = ds.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", 1):
        raise LoralabError(
            f"the DeepSpeed config sets gradient_accumulation_steps={gas}; loralab "
            "accumulates itself. Set it to auto (or 1) and pass --grad-accum instead.")
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.max_grad_norm


def adapt_to_backend(cfg, accelerator) -> list[str]:
    """Settle what a sharded run does differently; returns notes for the log.

    Resumable checkpoints store each rank's optimizer state, which FSDP and
    ZeRO split over the ranks, and the best-checkpoint restore writes into the
    weights; both are off when sharded. The final weights are gathered.
    """
    if not is_sharded(accelerator):
        return []
    _fit_deepspeed(cfg, accelerator)
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and getattr(plugin, "fsdp_version", 2) != 2:
        raise LoralabError("the accelerate config asks for FSDP version 1, whose flattened "
                           "weights loralab cannot save adapters from. Set fsdp_version: 2 in "
                           "its fsdp_config, or launch without it and pass --fsdp.")
    notes = []
    if cfg.save_checkpoints or cfg.keep_best:
        cfg.save_checkpoints = cfg.keep_best = False
        notes.append("sharded training (FSDP/DeepSpeed) keeps no resumable checkpoint and "
                     "ends with the last weights, not the best evaluated ones.")
    return notes


def check_shared_output(run_dir) -> None:
    """Every rank must see the run dir rank 0 just wrote: the best checkpoint
    and resumable checkpoints are read back from it by all ranks."""
    if world_size() > 1 and not (Path(run_dir) / "config.yaml").is_file():
        raise LoralabError(
            f"this process (rank {process_rank()}) cannot see {run_dir}, which rank 0 "
            "wrote. On several nodes, put --output on storage that every node mounts "
            "(NFS, Lustre, ...).")


# ---- equal work on every rank -----------------------------------------------------

def local_rows(batch: list[int], rank: int, world: int) -> tuple[list[int], float]:
    """This rank's share of a global micro-batch, and the weight of its loss.

    A global batch smaller than the world size (the last one of an epoch)
    leaves some ranks without a row; they still run forward and backward on
    one row with weight 0, because a rank that skips the gradient all-reduce
    stalls every other rank.
    """
    from loralab.data.batching import shard

    rows = shard(batch, rank, world)
    if rows or not batch:
        return rows, 1.0
    return batch[:1], 0.0


def rank_batches(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """Every ``world``-th batch from ``rank``, padded to the same count on every
    rank with repeats of the last batch (the shortest in a length-sorted plan):
    sharded weights are gathered in each forward, so all ranks must run the
    same number of forwards. The evaluator drops repeated rows."""
    if not batches:
        return []
    mine = batches[rank::world]
    count = -(-len(batches) // world)  # ceil
    return mine + [batches[-1]] * (count - len(mine))


# ---- whole weights out of shards ------------------------------------------------------

def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing is ever sharded this way
        return False
    return isinstance(t, DTensor)


@contextlib.contextmanager
def whole_trainable(model: torch.nn.Module, keep: bool = True, writeback: bool = False):
    """Inside the block, the trainable parameters of an FSDP2-sharded model are
    whole tensors (gathered one at a time, kept on the CPU); outside, sharded again.

    Frozen weights stay sharded, so saving a LoRA adapter of a model that only
    fits sharded costs the adapter's size, not the model's. Every rank must
    enter (gathering is a collective); ranks with ``keep=False`` take part
    but hold nothing (the ones that do not save). With ``writeback`` (all
    ranks keep) rank 0's whole tensors are scattered back into the shards on
    exit, after weights were loaded into them. Without sharding: a no-op.
    """
    _reshard(model)
    swapped, wholes = [], {}  # wholes: one per shard, so tied weights stay tied
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.requires_grad or not _is_dtensor(p):
                continue
            if id(p) not in wholes:
                whole = p.detach().full_tensor()  # all-gather: every rank, same order
                wholes[id(p)] = (torch.nn.Parameter(whole.cpu(), requires_grad=True)
                                 if keep or writeback else None)
                del whole
            if wholes[id(p)] is not None:
                module._parameters[name] = wholes[id(p)]
                swapped.append((module, name, p))
    try:
        yield model
    finally:
        done = set()
        for module, name, shard in swapped:
            if writeback and id(shard) not in done:
                _scatter_into(shard, wholes[id(shard)].detach())
                done.add(id(shard))
            module._parameters[name] = shard


def _reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 unit back to its sharded parameters (a unit that keeps
    its weights gathered after forward, like the root, holds plain tensors
    until its backward; after the last eval there is none)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _scatter_into(shard, whole: torch.Tensor) -> None:
    from torch.distributed.tensor import distribute_tensor

    # rank 0's whole tensor is the source: every rank receives its own shard of it
    local = distribute_tensor(whole.to(shard.device), shard.device_mesh, shard.placements)
    with torch.no_grad():
        shard.to_local().copy_(local.to_local())


# ---- failure barrier ----------------------------------------------------------------

class _Terminated(BaseException):
    """SIGTERM from the launcher: another process failed (or the job is cancelled)."""


class Stop:
    """What the failure barrier knows about the run: where its directory is."""

    run_dir: Path | None = None


def _store():
    try:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return None
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store means no report, never a new failure
        return None


def _describe(err: BaseException) -> str:
    if isinstance(err, LoralabError):
        return str(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# messages of collectives that broke because another rank went away
_SECONDARY = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "NCCL communicator was aborted", "Timed out", "timed out")


def _is_secondary(err: BaseException) -> bool:
    if isinstance(err, _Terminated):
        return True
    try:
        from torch.distributed import DistError

        if isinstance(err, DistError):
            return True
    except ImportError:
        pass
    return isinstance(err, RuntimeError) and any(s in str(err) for s in _SECONDARY)


def _publish(rank: int, text: str) -> bool:
    store = _store()
    if store is None:
        return False
    try:
        store.set(FAILURE_KEY.format(rank=rank), text)
        return True
    except Exception:  # noqa: BLE001
        return False


def _find_failure(world: int, wait_s: float) -> tuple[int, str] | None:
    store = _store()
    if store is None:
        return None
    keys = [FAILURE_KEY.format(rank=r) for r in range(world)]
    deadline = time.monotonic() + wait_s
    while True:
        try:
            for r, key in enumerate(keys):
                if store.check([key]):
                    return r, store.get(key).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - the store went away with the launcher
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def _stopped_message(world: int, stop: Stop, wait_s: float) -> str:
    found = _find_failure(world, wait_s)
    who = (f"process {found[0]} of {world} failed: {found[1].rstrip('.')}" if found else
           f"another of the {world} processes stopped without a report (killed, out of "
           "memory, or its node was lost; the launcher's output above names it)")
    where = ""
    if stop.run_dir is not None:
        ck = Path(stop.run_dir) / "checkpoint" / "trainer_state.json"
        where = (f"; continue from its last checkpoint with `loralab train --resume "
                 f"{stop.run_dir}`" if ck.exists() else "")
    return (f"training stopped on all processes: {who}. No adapter, model or metrics.json "
            f"was written{where}.")


def _watchdog(read_fd: int, stop: Stop, rank: int, world: int) -> None:
    """After SIGTERM, give the main thread STOP_GRACE_S to report and clean up;
    a main thread blocked inside a collective never returns, so exit for it."""
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        if signal.SIGTERM in data:
            break
    time.sleep(STOP_GRACE_S)
    if rank == 0:
        print(f"error: {_stopped_message(world, stop, 0.0)}", file=sys.stderr, flush=True)
    os._exit(128 + signal.SIGTERM)


@contextlib.contextmanager
def _sigterm_raises(stop: Stop, rank: int, world: int):
    """SIGTERM raises ``_Terminated`` in the main thread (once); a watchdog thread
    ends the process if the main thread cannot get there in time."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = {"stopping": False}

    def handler(signum, frame):
        if not state["stopping"]:
            state["stopping"] = True
            raise _Terminated()

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.signal(signal.SIGTERM, handler)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watchdog, args=(read_fd, stop, rank, world), daemon=True,
                     name="loralab-stop-watchdog").start()
    try:
        yield state
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGTERM, previous)
        os.close(write_fd)  # the watchdog reads EOF and ends


_ACTIVE = threading.local()


@contextlib.contextmanager
def failure_barrier():
    """Run a training process so that one failing rank stops them all cleanly.

    The failing rank leaves its message in the process group's store and
    exits; the others break out of their next collective (or get SIGTERM from
    the launcher) and exit too. Rank 0 reports the first failure as one
    ``LoralabError`` line; other ranks stay quiet unless the error is a bug
    (its traceback is printed where it happened) or no store could carry it.
    Atomic writes leave no half-written adapter, model or metrics.json.
    """
    outer = getattr(_ACTIVE, "stop", None)
    if outer is not None:  # nested (the command around run_training): the outer one acts
        yield outer
        return
    stop = Stop()
    world, rank = world_size(), process_rank()
    if world == 1:
        yield stop
        return
    _ACTIVE.stop = stop
    try:
        with _sigterm_raises(stop, rank, world) as state:
            try:
                yield stop
            except BaseException as err:
                if state is not None:
                    state["stopping"] = True  # from here on SIGTERM waits for the report
                _stop_all(err, stop, rank, world)
                raise
    finally:
        _ACTIVE.stop = None


def _stop_all(err: BaseException, stop: Stop, rank: int, world: int) -> None:
    """Raise what this rank should exit with after ``err`` (return: ``err`` itself)."""
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        return  # Ctrl-C reaches every rank itself; an exit is already decided
    primary = not _is_secondary(err)
    if primary:
        _publish(rank, _describe(err))
    if rank == 0:
        if primary:
            return  # rank 0's own error is reported as usual
        raise LoralabError(_stopped_message(world, stop, REPORT_WAIT_S)) from err
    if primary and not isinstance(err, LoralabError):
        return  # a bug: its traceback is shown where it happened
    # rank 0 reports it (a bad option or input before the process group exists
    # fails the same way on every rank, so rank 0 reports its own copy)
    raise SystemExit(2 if primary else 1) from None
