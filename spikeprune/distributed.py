"""Several processes, one run: torch.distributed, launched by torchrun.

    torchrun --nproc_per_node N -m spikeprune train|finetune|evaluate|prune|sensitivity ...

torchrun starts one process per device and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT. The command line enters `launched(args)` around every command: it sees those
variables and joins the process group -- NCCL with --device cuda (process i of a machine on
cuda:LOCAL_RANK), gloo on the CPU. Without them (or with one process) every function here is the
one-process identity, so the library behaves exactly as before.

What each job does across processes (rank 0 is the main process):

  evaluate     the split's batches, formed exactly as one process forms them, are dealt out
               round-robin (batch i to process i mod N); hit, image and loss sums are added up
               across processes (the counts as integers), so top-1 / top-5 are those of one
               process on any split size: nothing is padded, no image is counted twice.
  train        DistributedDataParallel. --batch-size is the GLOBAL batch: every step each process
               takes batch/N images of the one-process run's batch (same seed, same order), so
               the gradients are averaged over the same images; a world size that does not divide
               the batch is refused. With --sync-bn every BatchNorm normalises with the statistics
               of the whole global batch (`sync_batchnorm`; torch's own SyncBatchNorm refuses CPU
               tensors), and the run equals a one-process run within float rounding; without it
               each process normalises with its own share, as plain DDP does. Augmentation draws
               differ between processes. Checkpoints hold the plain model and optimizer, so a run
               resumes on any number of processes.
  sensitivity  the (group, ratio) candidates are shared out a group at a time (all ratios of a
               group on one process, since a ratio keeping as many units as a smaller one copies
               its row), largest estimated cost first to the least-loaded process; rows are
               exchanged after every round and rank 0 writes them; at the end the CSV is rewritten
               in the one-process order: the same table, the same file.
  prune        every process runs the policy; each calibration evaluation is sharded as in
               evaluate, so all processes see the same accuracies and take the same decisions.

Only rank 0 writes -- checkpoints, the run folder, reports, tables (atomically, as always); what it
reads back when resuming is broadcast, so the output folder needs to exist on rank 0's machine only.

Failures: the process group has a timeout (SPIKEPRUNE_DIST_TIMEOUT seconds, default 600); a process
that dies or stops answering makes the others stop with a SpikepruneError naming the step (at once
when a process dies and its connections close, after the timeout when it hangs). torchrun also stops
a machine's other processes when one fails. Finished checkpoints are kept: rerun to resume.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from datetime import timedelta
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from tqdm import std as tqdm_std

from .errors import SpikepruneError

TIMEOUT_ENV = "SPIKEPRUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0  # long enough for rank 0 to write a checkpoint or time latency while the others wait
_RANK_SEED_STRIDE = 1_000_003  # process r draws its augmentation from seed + r * this


# ------------------------------------------------------------------------------------------------
# Who am I
# ------------------------------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    """True inside a process group of two or more processes."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the one process that writes files (and the only one there is without torchrun)."""
    return rank() == 0


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise SpikepruneError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        raise SpikepruneError(f"the torchrun variable {name} is {os.environ.get(name)!r}, not a whole number; "
                              "start spikeprune with torchrun (or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR "
                              "and MASTER_PORT yourself)") from None


_joined = False  # this process joined a group at some point (the command line's exit depends on it)


def joined_a_group() -> bool:
    """True once this process has joined a process group of two or more, even after leaving it."""
    return _joined


def init(device: str = "cpu") -> bool:
    """Join the process group torchrun describes in the environment. Returns True when this
    process is one of two or more. With --device cuda, process LOCAL_RANK uses cuda:LOCAL_RANK."""
    if not launched_by_torchrun() or dist.is_initialized():
        return active()
    world, r = _env_int("WORLD_SIZE"), _env_int("RANK")
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else r
    if world < 1 or not 0 <= r < world:
        raise SpikepruneError(f"RANK {r} is not one of the {world} processes WORLD_SIZE announces")
    if world == 1:
        return False  # torchrun --nproc_per_node 1: one process, nothing to join
    cuda = str(device).startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise SpikepruneError("--device cuda was asked for but this torch has no usable CUDA device; "
                                  "use --device cpu (gloo)")
        if local >= torch.cuda.device_count():
            raise SpikepruneError(f"process LOCAL_RANK {local} has no GPU of its own: this machine has "
                                  f"{torch.cuda.device_count()}; start at most that many (--nproc_per_node)")
        torch.cuda.set_device(local)  # "cuda" now means this process's GPU everywhere
    backend = "nccl" if cuda else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    except Exception as e:  # the rendezvous failed: a wrong address, a port in use, a missing peer
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise SpikepruneError(f"process {r} of {world} could not join the {backend} process group at {where} "
                              f"within {timeout_s():g} s ({_first_line(e)}); check --master-addr / --master-port "
                              "(or --rdzv-endpoint) and that every node starts the same command") from None
    global _joined
    _joined = True
    return True


@contextlib.contextmanager
def launched(args):
    """Around one command of the command line: join the torchrun process group if there is one,
    quiet the other processes (no progress bars; their stdout is dropped, so tables and JSON are
    printed once, by rank 0; errors still reach stderr), seed torch alike in every process (a
    preset MODEL starts from the same random weights), turn a lost process into one
    SpikepruneError, and leave the group at the end."""
    joined = init(getattr(args, "device", "cpu"))
    if not joined:
        yield
        return
    torch.manual_seed(getattr(args, "seed", 0) or 0)  # a preset MODEL: the same random weights everywhere
    stdout = sys.stdout
    restore_bars = None
    if not is_main():
        if hasattr(args, "quiet"):
            args.quiet = True
        restore_bars = _silence_progress_bars()
        sys.stdout = open(os.devnull, "w")
    try:
        with collective(f"spikeprune {getattr(args, 'command', '')}".strip()):
            yield
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
        if restore_bars is not None:
            restore_bars()
        dist.destroy_process_group()


def _silence_progress_bars():
    """Make every tqdm bar of this process a silent one, even those given disable=False (tqdm reads
    TQDM_DISABLE only when it is imported, before a process knows its rank); returns the undo."""
    original = tqdm_std.tqdm.__init__

    def silent_init(self, *a, **kw):
        kw["disable"] = True
        original(self, *a, **kw)

    tqdm_std.tqdm.__init__ = silent_init

    def restore():
        tqdm_std.tqdm.__init__ = original
    return restore


# ------------------------------------------------------------------------------------------------
# Collectives, with failures turned into one clear error
# ------------------------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


_LOST_PEER_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout", "pair closure")


def _is_communication_error(e: BaseException) -> bool:
    """A failed collective: torch's DistError, or the RuntimeError gloo / DDP raise for a lost peer."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(k in text for k in _LOST_PEER_WORDS)


@contextlib.contextmanager
def collective(what: str):
    """Turn a failed collective inside the block into a SpikepruneError that says which step
    failed, that another process stopped or hung, and how to go on."""
    try:
        yield
    except SpikepruneError:
        raise
    except Exception as e:
        if not (active() or dist.is_initialized()) or not _is_communication_error(e):
            raise
        raise SpikepruneError(
            f"{what}: process {rank()} of {world_size()} lost the others -- one of them stopped, or did not answer "
            f"within {timeout_s():g} s ({_first_line(e)}). Finished checkpoints are kept: rerun the command to resume "
            f"(train / finetune: with --resume), on any number of processes; {TIMEOUT_ENV} sets the wait") from None


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_exact(*values):
    """Each value added up over all processes: ints as int64 (exact), floats as float64. One
    process: the values unchanged. Returns a tuple in the same order."""
    if not active():
        return values
    dev = _comm_device()
    is_int = [isinstance(v, int) and not isinstance(v, bool) for v in values]
    ints = torch.tensor([int(v) for v, i in zip(values, is_int) if i], dtype=torch.int64, device=dev)
    floats = torch.tensor([float(v) for v, i in zip(values, is_int) if not i], dtype=torch.float64, device=dev)
    with collective("adding up metrics across processes"):
        for t in (ints, floats):
            if t.numel():
                dist.all_reduce(t)
    ints, floats = iter(ints.tolist()), iter(floats.tolist())
    return tuple(next(ints) if i else next(floats) for i in is_int)


def mean_over_processes(value: float) -> float:
    """The average of `value` over all processes (each process's mean loss of its equal share
    of a step: the mean loss of the global batch)."""
    if not active():
        return value
    return sum_exact(float(value))[0] / world_size()


def from_main(fn: Callable, what: str):
    """fn() computed by rank 0 (e.g. reading a file only it may have), handed to every process.
    An error on rank 0 is raised on every process: the same SpikepruneError message."""
    if not active():
        return fn()
    box, failure = [None], None
    if is_main():
        try:
            box = [("ok", fn())]
        except SpikepruneError as e:
            box, failure = [("error", str(e))], e
        except BaseException as e:
            box, failure = [("error", f"{what} failed in process 0 ({type(e).__name__}: {_first_line(e)})")], e
    with collective(what):
        dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    kind, value = box[0]
    if kind == "error":
        error = SpikepruneError(value)
        error.reported_by_main = True  # process 0 raised it too and prints it: the others stay quiet
        raise error
    return value


def report_error(message: str, error: BaseException | None = None) -> None:
    """Print a command's one-line error once across the processes of a group. Under torchrun each
    process also leaves the line in the error file torchrun reads (TORCHELASTIC_ERROR_FILE), so the
    launcher's failure summary names it instead of pointing to a traceback; a process other than 0
    then stays silent (process 0 prints the errors they share; one only it met is in that summary).
    Without an error file, another process stays silent only about an error process 0 raised too."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE") if launched_by_torchrun() else None
    written = False
    if path and not os.path.exists(path):
        try:
            with open(path, "w") as f:
                # the layout torch's own @record writes; the summary shows py_callstack as the traceback
                json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                          "timestamp": str(int(time.time()))}}}, f)
            written = True
        except OSError:
            pass  # the summary then shows torchrun's default text; the line below is printed
    other = joined_a_group() and os.environ.get("RANK", "0") != "0"
    if not (other and (written or getattr(error, "reported_by_main", False))):
        sys.stderr.write(message + "\n")  # one write: the processes' lines do not run together
        sys.stderr.flush()


def gather_objects(obj, what: str) -> list:
    """[obj of process 0, obj of process 1, ...] on every process (picklable objects)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    with collective(what):
        dist.all_gather_object(out, obj)
    return out


def barrier(what: str) -> None:
    if active():
        with collective(what):
            dist.barrier()


# ------------------------------------------------------------------------------------------------
# Evaluation: whole batches dealt out round-robin
# ------------------------------------------------------------------------------------------------
class _OwnBatches:
    """Any loader, read whole, keeping the batches i with i mod N == rank (a loader we cannot
    rebuild by index, e.g. a shuffled one; the sequential case below reads only its own)."""

    def __init__(self, loader, total: int):
        self.loader, self.total, self.dataset = loader, total, getattr(loader, "dataset", None)

    def __iter__(self):
        r, w = rank(), world_size()
        for i, batch in enumerate(self.loader):
            if i >= self.total:
                break
            if i % w == r:
                yield batch

    def __len__(self) -> int:
        return len(range(rank(), self.total, world_size()))


def shard_batches(loader, total: int):
    """(the batches of `loader` this process evaluates, how many) among the first `total`
    batches: batch i goes to process i mod N, formed exactly as one process forms it (same
    images, same batch size), so per-image results equal the one-process ones. One process:
    (loader, total)."""
    if not active():
        return loader, total
    r, w = rank(), world_size()
    sampler = getattr(loader, "batch_sampler", None)
    if isinstance(sampler, BatchSampler) and isinstance(sampler.sampler, SequentialSampler):
        n, bs = len(loader.dataset), sampler.batch_size
        # (none when there are more processes than batches: this one then adds zeros to the sums)
        batches = [list(range(i * bs, min(n, (i + 1) * bs))) for i in range(r, total, w)]
        mine = DataLoader(loader.dataset, batch_sampler=batches, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                          worker_init_fn=loader.worker_init_fn, generator=loader.generator)
        return mine, len(batches)
    own = _OwnBatches(loader, total)
    return own, len(own)


# ------------------------------------------------------------------------------------------------
# Training: the one-process global batches, split between the processes
# ------------------------------------------------------------------------------------------------
class _RankSlices:
    """A batch sampler: images [r*b, (r+1)*b) of each batch the one-process batch sampler yields."""

    def __init__(self, batches, r: int, share: int):
        self.batches, self.r, self.share = batches, r, share

    def __iter__(self):
        for batch in self.batches:
            yield list(batch)[self.r * self.share:(self.r + 1) * self.share]

    def __len__(self) -> int:
        return len(self.batches)


def check_global_batch(batch_size: int) -> int:
    """The per-process share of a global batch; refuses a world size that does not divide it."""
    w = world_size()
    if batch_size % w:
        lower, upper = batch_size - batch_size % w, batch_size + w - batch_size % w
        hint = f"{lower} or {upper}" if lower else f"{upper}"
        raise SpikepruneError(f"--batch-size {batch_size} is the global batch, split evenly between the {w} processes, "
                              f"and {w} does not divide it: use a multiple of {w} (e.g. {hint})")
    return batch_size // w


def shard_train_loader(loader: DataLoader) -> DataLoader:
    """This process's part of a (shuffled) training loader: every step, the global batch the
    one-process loader would yield, of which process r takes images [r*b, (r+1)*b), b = batch / N.
    The one-process loader's own batch sampler and random generator drive it, so its generator is
    drawn from exactly as when the one-process loader is iterated: the same order, whatever wraps
    the iteration. The augmentation draws of process r > 0 are re-seeded from the current seed +
    r * a stride, so processes do not repeat one another's crops. One process: `loader` unchanged."""
    if not active():
        return loader
    r, share = rank(), check_global_batch(loader.batch_size)
    if r:
        torch.manual_seed((torch.initial_seed() + r * _RANK_SEED_STRIDE) % (2**63))
    return DataLoader(loader.dataset, batch_sampler=_RankSlices(loader.batch_sampler, r, share),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn, generator=loader.generator)


_SYNCED: dict[type, type] = {}


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Training-mode BatchNorm over the global batch: sums of x and x^2 per channel and the count,
    added up over all processes with an all-reduce that gradients flow back through (so each
    process's inputs get their share of every process's loss), in float64."""
    from torch.distributed.nn.functional import all_reduce  # lazy heavy import: loads torch.distributed.nn

    c = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    xd = x.double()
    local = torch.cat([xd.sum(dims), (xd * xd).sum(dims), xd.new_full((1,), x.numel() // c)])
    with collective("synchronising BatchNorm statistics"), warnings.catch_warnings():
        # deprecated in favour of a private module without autograd; this public one has it
        warnings.simplefilter("ignore", FutureWarning)
        total = all_reduce(local)
    n = total[2 * c]
    mean = total[:c] / n
    var = (total[c:2 * c] / n - mean * mean).clamp_min(0)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            unbiased = var * n / (n - 1).clamp_min(1)
            bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
            bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)
    shape = [1, c] + [1] * (x.dim() - 2)
    y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var + bn.eps).to(x.dtype).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y


def _synced_class(cls: type) -> type:
    if cls not in _SYNCED:
        def forward(self, x):
            if self.training and active():
                return _global_batch_norm(self, x)
            return cls.forward(self, x)
        _SYNCED[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                   "_spikeprune_synced_from": cls})
    return _SYNCED[cls]


def sync_batchnorm(model: nn.Module) -> Callable[[], None]:
    """Make every BatchNorm of `model` normalise over the global batch while training on several
    processes (its class is swapped for a subclass, so isinstance checks, the state dict and
    saving are unchanged); returns the function that swaps them back."""
    swapped = []
    for m in model.modules():
        cls = type(m)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not hasattr(cls, "_spikeprune_synced_from"):
            m.__class__ = _synced_class(cls)
            swapped.append((m, cls))

    def restore():
        for m, cls in swapped:
            m.__class__ = cls
    return restore


def data_parallel(model: nn.Module, device, sync_bn: bool = False) -> tuple[nn.Module, Callable[[], None]]:
    """(the module to train, the function that undoes the wrapping). Several processes:
    DistributedDataParallel around `model` (rank 0's weights and buffers are broadcast to all when
    it is built), with sync_bn the global-batch BatchNorm; `model` itself stays the plain module to
    evaluate and save. One process: (model, a no-op)."""
    if not active():
        return model, lambda: None
    from torch.nn.parallel import DistributedDataParallel  # lazy heavy import: torch.distributed's reducer machinery

    restore = sync_batchnorm(model) if sync_bn else (lambda: None)
    dev = torch.device(device)
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    try:
        with collective("starting DistributedDataParallel"):
            # unused parameters are allowed: some families carry parameters their forward never reads
            wrapped = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    except BaseException:
        restore()
        raise
    return wrapped, restore


def share_training_state(start_epoch: int, history: list, best, opt: torch.optim.Optimizer, scaler=None):
    """After rank 0 opened the output folder (and maybe resumed): every process continues from
    the same epoch, history and optimizer state (the weights follow when DDP is built)."""
    if not active():
        return start_epoch, history, best
    state = None
    if is_main():
        state = {"epoch": start_epoch, "history": history, "best": best,
                 "optimizer": opt.state_dict() if start_epoch else None,
                 "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
    state = from_main(lambda: state, "sharing the training state")
    if not is_main():
        if state["optimizer"] is not None:
            opt.load_state_dict(state["optimizer"])
        if state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
    return state["epoch"], state["history"], state["best"]


# ------------------------------------------------------------------------------------------------
# Sharing out work items (the sensitivity analysis' candidates)
# ------------------------------------------------------------------------------------------------
def assign_groups(costs: dict[str, float], n: int) -> list[list[str]]:
    """Groups to processes: largest cost first, each to the least-loaded process (ties: the
    lower rank, then the earlier group). Deterministic, so every process computes the same."""
    load, out = [0.0] * n, [[] for _ in range(n)]
    for name in sorted(costs, key=lambda k: -costs[k]):
        k = min(range(n), key=lambda i: (load[i], i))
        out[k].append(name)
        load[k] += costs[name]
    return out


def share_by_group(items: list, group_of: Callable, cost_of: Callable, key_of: Callable, results: dict,
                   on_received: Callable | None = None, what: str = "sharing work") -> Iterator:
    """Yield this process's share of `items` (a group's items all go to one process, in their
    order; groups are assigned by `assign_groups`). The caller stores the result of each item it
    is given in results[key_of(item)]; after every round (each process's next group) the results
    are exchanged, so `results` ends up complete on every process, and on_received(result) is
    called for each result another process computed. One process: `items` in order."""
    if not active():
        yield from items
        return
    groups: dict = {}
    for item in items:
        groups.setdefault(group_of(item), []).append(item)
    costs = {g: float(sum(cost_of(i) for i in its)) for g, its in groups.items()}
    assigned = assign_groups(costs, world_size())
    mine = assigned[rank()]
    for k in range(max(len(a) for a in assigned)):
        batch = groups[mine[k]] if k < len(mine) else []
        for item in batch:
            yield item
        done = [(key_of(item), results[key_of(item)]) for item in batch]
        for r, theirs in enumerate(gather_objects(done, what)):
            if r == rank():
                continue
            for key, value in theirs:
                results[key] = value
                if on_received is not None:
                    on_received(value)


__all__ = ["DEFAULT_TIMEOUT_S", "TIMEOUT_ENV", "active", "assign_groups", "barrier", "check_global_batch",
           "collective", "data_parallel", "from_main", "gather_objects", "init", "is_main", "joined_a_group",
           "launched", "launched_by_torchrun", "mean_over_processes", "rank", "shard_batches", "shard_train_loader",
           "share_by_group", "share_training_state", "sum_exact", "sync_batchnorm", "world_size"]
