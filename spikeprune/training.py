"""Training, evaluation and fine-tuning with knowledge distillation: one loop for all three.

    train(model, data, TrainSettings(epochs, ...), ...)   -> (model, history)   (or an epoch count alone)
    finetune(model, data, epochs, teacher=None, ...)      -> (model, history)   (train() with fine-tuning defaults)
    evaluate(model, data, split="test", ...)              -> {"top1", "top5", "loss", "n"}

Recipe: AdamW; the learning rate is set every step: a linear warm-up over `warmup_epochs`, then a
cosine decay to lr * MIN_LR_FACTOR at the last step; cross-entropy with label smoothing; with a
`teacher`, the loss is
    kd_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - kd_weight) * CE
(T = kd_temperature; the T^2 keeps the soft term's gradients on the scale of the hard one's).
Mixed precision only on CUDA (bf16, or fp16 with loss scaling where bf16 is missing); on the CPU
everything stays float32.

Determinism: at the start of epoch e, torch's generator (augmentation) and the shuffle order are
seeded from (seed, e). Nothing else random carries over between epochs, so the same command on
the CPU gives bit-identical weights, and a run resumed after epoch e ends with the weights an
uninterrupted one reaches (the model, the optimizer moments and the epoch count are checkpointed).
"The same" includes the machine: the CPU kernels (MKL, oneDNN) order their float32 sums by thread
count and instruction set, so another torch.get_num_threads() (`threads`, recorded in the settings)
or an AVX2 CPU instead of an AVX-512 one gives other weights from the first step on. Measured on the
demo (one epoch of distillation fine-tuning, 1,000 test images): 98.5% test top-1 at 2 threads,
98.2% at 1 thread, 98.2% with AVX2 kernels at 2 threads.

Output folder OUT (output):
    OUT/config.json            } the model after the last completed epoch -- once training ends, the
    OUT/model.safetensors      } final model. A save_model folder: load_model(OUT), `spikeprune evaluate OUT`
    OUT/history.json           settings, per-epoch metrics (train loss / accuracy, calib accuracy),
                               best calib epoch
    OUT/best/                  the model after the epoch with the best calibration top-1 so far (a
                               save_model folder; when the last epoch is not the best, the one to
                               choose on the calibration split). Only when calibration data is given.
    OUT/checkpoint/            what --resume reads, replaced as one folder after every epoch:
        model/                           the model (a save_model folder)
        optimizer.safetensors            AdamW moments per parameter (plain tensors, no pickle)
        train_state.json                 epochs done, global step, settings, seed, history,
                                         optimizer hyper-parameters, loss-scaler state
Every file is written under a temporary name and renamed into place, so an interrupted run (Ctrl-C,
a crash, a NaN loss) leaves the last complete checkpoint and nothing half-written.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import distributed
from .data import dataset_for_model, make_loader
from .errors import SpikepruneError
from . import validation
from .serialization import (CONFIG_NAME, FORMAT, WEIGHTS_NAME, atomic_path, clean_interrupted_write, load_model,
                            read_safetensors, save_model, write_json, write_safetensors)
from .validation import check_finite, check_writable, deprecation, refuse_symlink, renamed_arguments

MIN_LR_FACTOR = 0.01  # the cosine ends at 1% of the peak learning rate
STATE_FORMAT = "spikeprune-train-state"
CHECKPOINT = "checkpoint"
BEST = "best"  # OUT/best/: the best calibration epoch's model
OPTIMIZER_NAME, STATE_NAME, HISTORY_NAME = "optimizer.safetensors", "train_state.json", "history.json"


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def _as_loader(data, model, split: str, batch_size: int, workers: int = 0, max_images: int | None = None) -> DataLoader:
    if isinstance(data, DataLoader):
        if max_images is not None:
            raise SpikepruneError("max_images caps a dataset spec or a Dataset; a DataLoader is used as it is")
        return data
    if isinstance(data, str):
        data = dataset_for_model(data, model, split, max_images=max_images)
    elif isinstance(data, Dataset) and max_images is not None and max_images < len(data):
        data = torch.utils.data.Subset(data, range(max_images))  # a spec is capped stratified; a Dataset, its first N
    if isinstance(data, Dataset):
        return make_loader(data, batch_size, workers=workers)
    raise SpikepruneError(f"data must be a dataset spec (e.g. 'mnist5k'), a Dataset or a DataLoader, "
                          f"not {type(data).__name__}")


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _amp_dtype(device: torch.device, amp: bool):
    if not amp or device.type != "cuda":
        return None  # CPU autocast would only slow these small GEMMs down and change the numbers
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpikepruneError("--device cuda was asked for but this torch has no usable CUDA device; use --device cpu")
    return device


def evaluate(model: nn.Module, data, split: str = "test", batch_size: int = 256, device="cpu",
             max_batches: int | None = None, progress: bool = True, amp: bool = False, workers: int = 0,
             max_images: int | None = None) -> dict:
    """Top-1 / top-5 accuracy (fractions in [0, 1]), mean cross-entropy and image count of `model`
    on `data`: a spec string (its `split` is loaded at the model's image size), a Dataset or a
    DataLoader. Top-5 is top-k with k = the number of classes when there are fewer than 5.
    The model is moved to `device` and left in the train/eval mode it came in. A model with NaN or
    Inf weights, or one that computes a NaN or Inf logit, is a SpikepruneError, never a figure.
    max_images: at most this many images (of a spec: stratified by class, as --max-images; of a
    Dataset: its first ones); max_batches: at most this many batches."""
    _check_count("batch_size", batch_size, minimum=1)
    _check_count("workers", workers, minimum=0)
    if max_batches is not None:
        _check_count("max_batches", max_batches, minimum=1)
    check_finite(model, "the model to evaluate")
    dev = _device(device)
    max_images = validation.max_images(max_images)
    loader = _as_loader(data, model, split, batch_size, workers, max_images)
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    name = getattr(loader.dataset, "name", None)
    loader, total = distributed.shard_batches(loader, total)  # several processes: batch i to process i mod N
    model.to(dev)
    was_training = model.training
    model.eval()
    n, hit1, hitk, loss_sum = 0, 0, 0, 0.0
    desc = f"eval {name}:{getattr(loader.dataset, 'split', split)}" if name else "eval"
    try:
        with torch.inference_mode(), _autocast(dev, _amp_dtype(dev, amp)):
            for i, (images, labels) in enumerate(tqdm(loader, total=total, desc=desc, disable=not progress,
                                                      leave=False, file=sys.stderr)):
                if i >= total:
                    break
                images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
                logits = model(images).float()
                if not bool(torch.isfinite(logits).all()):
                    raise SpikepruneError(f"the model computed NaN or Inf logits on batch {i + 1} of {desc}; its "
                                          "weights are finite, so its arithmetic overflows: it cannot be evaluated")
                k = min(5, logits.shape[1])
                top = logits.topk(k, dim=1).indices
                hit1 += (top[:, 0] == labels).sum().item()
                hitk += (top == labels[:, None]).any(1).sum().item()
                loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
                n += len(labels)
    finally:
        model.train(was_training)
    n, hit1, hitk, loss_sum = distributed.sum_exact(n, hit1, hitk, loss_sum)
    if n == 0:
        raise SpikepruneError("nothing was evaluated: the data is empty (or max_batches is 0)")
    return {"top1": hit1 / n, "top5": hitk / n, "loss": loss_sum / n, "n": n}


def recalibrate_batchnorm(model: nn.Module, batches, device="cpu", only: set[str] | None = None) -> int:
    """Re-estimate every BatchNorm's running mean and variance from `batches` (an iterable of image
    tensors, or of (images, labels)): the cumulative average over them, as if the statistics had
    been measured on these images from the start ("adaptive BN", EagleEye, ECCV 2020). Only the
    BatchNorm layers run in train mode; weights are not touched and no gradient is kept. Pruning
    removes channels that fed the later layers, so their stored statistics describe a model that no
    longer exists; re-estimating them is cheap and recovers much of the accuracy lost.
    only: names of the BatchNorm modules to re-estimate (None: all); the others keep their statistics
    and normalise with them (a layer upstream of a cut sees the same inputs as before it).
    Returns the number of images seen; the model is left in eval mode on `device`."""
    dev = _device(device)
    model.to(dev).eval()
    bns = [m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and (only is None or name in only)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts the same
        m.train()
    n = 0
    try:
        with torch.no_grad():
            for batch in batches:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(images.to(dev))
                n += len(images)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    if n == 0:
        raise SpikepruneError("re-estimating BatchNorm statistics needs at least one image; none was given")
    return n


def _check_count(name: str, value, minimum: int) -> None:
    validation.whole(name, value, minimum)


def _check_number(name: str, value, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                  high_open: bool = False) -> None:
    if isinstance(value, str):  # Python callers pass numbers; a string here is a mistake, not "3"
        raise SpikepruneError(f"{name} must be a finite number, got {value!r}")
    validation.number(name, value, low, high, low_open=low_open, high_open=high_open)


def check_training_settings(*, epochs: int, lr: float, weight_decay: float = 0.0, warmup_epochs: float = 0.0,
                            batch_size: int = 64, label_smoothing: float = 0.0, kd_weight: float = 0.5,
                            kd_temperature: float = 4.0, max_grad_norm: float | None = None, workers: int = 0,
                            eval_batch_size: int = 256, max_steps_per_epoch: int | None = None, seed: int = 0,
                            threads: int | None = None, cli: bool = False) -> None:
    """Every cheap check of train() / finetune()'s settings, each a one-line SpikepruneError: run
    before any data is read or any evaluation is spent (the CLI calls it first). cli: name the
    settings by their command-line flags (--lr) in the messages."""

    def nm(name: str) -> str:
        return "--" + name.replace("_", "-") if cli else name

    _check_count(nm("epochs"), epochs, minimum=1)
    _check_number(nm("lr"), lr, low=0, low_open=True)
    _check_number(nm("weight_decay"), weight_decay, low=0)
    _check_number(nm("warmup_epochs"), warmup_epochs, low=0)
    _check_count(nm("batch_size"), batch_size, minimum=1)
    _check_number(nm("label_smoothing"), label_smoothing, low=0, high=1, high_open=True)
    _check_number(nm("kd_weight"), kd_weight, low=0, high=1)
    _check_number(nm("kd_temperature"), kd_temperature, low=0, low_open=True)
    if max_grad_norm is not None:
        _check_number(nm("max_grad_norm"), max_grad_norm, low=0, low_open=True)
    _check_count(nm("workers"), workers, minimum=0)
    _check_count(nm("eval_batch_size"), eval_batch_size, minimum=1)
    if max_steps_per_epoch is not None:
        _check_count(nm("max_steps_per_epoch"), max_steps_per_epoch, minimum=1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpikepruneError(f"{nm('seed')} must be a whole number, got {seed!r}")
    if threads is not None:
        _check_count(nm("threads"), threads, minimum=1)


def check_teacher_fits(teacher: nn.Module, model: nn.Module) -> None:
    """The teacher sees the student's images and its logits are compared class by class: image size,
    channels and classes must agree (else distillation fails at its first batch, minutes in)."""
    t_cfg, s_cfg = getattr(teacher, "cfg", None), getattr(model, "cfg", None)
    if t_cfg is None or s_cfg is None:
        return
    wrong = [f"{k} {getattr(t_cfg, k)} (the model: {getattr(s_cfg, k)})" for k in ("img_size", "in_channels", "num_classes")
             if hasattr(t_cfg, k) and hasattr(s_cfg, k) and getattr(t_cfg, k) != getattr(s_cfg, k)]
    if wrong:
        raise SpikepruneError(f"the teacher (--teacher) does not fit the model it would teach: it has {', '.join(wrong)}; "
                              "distil from a model of the same input and classes (e.g. the dense model)")


@renamed_arguments(out_dir="output", overwrite="force")
def check_output_folder(output, resume: bool = False, force: bool = False) -> Path:
    """Refuse, before any work, an output folder train() could not use: a file, an unwritable place,
    a folder with another run (unless resume / force), a config.json spikeprune did not write
    (never deleted, even with force). Cleans what a killed earlier run left (temporaries, a
    half-swapped checkpoint folder)."""
    out = refuse_symlink(Path(output), "output folder")
    if out.exists() and not out.is_dir():
        raise SpikepruneError(f"{out} exists and is not a folder; choose another output folder")
    check_writable(out, "output folder")
    if not out.is_dir():
        return out
    foreign = _foreign_entries(out)
    if foreign:  # replacing a run replaces these names wholesale: a user's file among them would be lost
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise SpikepruneError(f"{out} holds files a training run did not write ({shown}); they are left alone "
                              "(even with --force): choose a new output folder, or empty this one first")
    config = out / CONFIG_NAME
    if config.exists():
        try:
            ours = json.loads(config.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise SpikepruneError(f"{out} holds a {CONFIG_NAME} that spikeprune did not write; it is left alone: "
                                  "choose another output folder")
    _clean_stale_temps(out)
    if (_read_checkpoint(out) or config.exists()) and not resume and not force:
        raise SpikepruneError(f"{out} already holds a training run; pass --resume to continue it, "
                              "--force to replace it, or choose another folder")
    return out


# ------------------------------------------------------------------------------------------------
# Loss and schedule
# ------------------------------------------------------------------------------------------------
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, kd_weight: float,
            temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """kd_weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - kd_weight) * CE(student, labels)."""
    T = temperature
    soft = F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                    reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return kd_weight * T * T * soft + (1.0 - kd_weight) * hard


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine to lr * MIN_LR_FACTOR at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    low = lr * MIN_LR_FACTOR
    return low + (lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(seed) * 100_003 + int(epoch)


# ------------------------------------------------------------------------------------------------
# Checkpoints: tensors in safetensors, everything else in JSON
# ------------------------------------------------------------------------------------------------
def _optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "state_scalars": scalars}


def _optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for name, value in list(tensors.items()) + list(meta["state_scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise SpikepruneError(f"the optimizer state in the checkpoint does not fit this model ({e})") from None


def _write_checkpoint(out: Path, model, opt, scaler, state: dict, history_doc: dict) -> None:
    tensors, opt_meta = _optimizer_to_files(opt)
    state = dict(state, optimizer=opt_meta, scaler=scaler.state_dict() if scaler.is_enabled() else None)
    with atomic_path(out / CHECKPOINT, is_dir=True) as tmp:
        save_model(model, tmp / "model", extra={"epochs_trained": state["epoch"], "data": state["settings"]["data"]})
        write_safetensors(tensors, tmp / OPTIMIZER_NAME)
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    # The top-level model is the checkpoint's, linked (not copied) and swapped in file by file.
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        with atomic_path(out / name) as tmp:
            tmp.unlink()
            try:
                os.link(out / CHECKPOINT / "model" / name, tmp)
            except OSError:  # a file system without hard links
                shutil.copyfile(out / CHECKPOINT / "model" / name, tmp)
    write_json(out / HISTORY_NAME, history_doc)


def _read_checkpoint(out: Path) -> tuple[Path, dict] | None:
    ckpt = out / CHECKPOINT
    clean_interrupted_write(ckpt)  # killed while swapping the folders: the previous one is put back
    if not (ckpt / STATE_NAME).is_file():
        return None
    try:
        state = json.loads((ckpt / STATE_NAME).read_text())
    except json.JSONDecodeError as e:
        raise SpikepruneError(f"{ckpt / STATE_NAME} is damaged ({e}); start a new run in another folder") from None
    if state.get("format") != STATE_FORMAT:
        raise SpikepruneError(f"{ckpt / STATE_NAME} is not a spikeprune training state")
    return ckpt, state


def _foreign_entries(out: Path) -> list[str]:
    """What in the existing folder `out` train() did not write: names outside its layout (and its
    temporaries), and any of its names holding something else (a checkpoint folder without a
    training state or with other files, a best/ that is not a saved model, a history.json that is
    not a training history). train() replaces these names wholesale, so they must all be its own."""
    ours = (CHECKPOINT, BEST, CONFIG_NAME, WEIGHTS_NAME, HISTORY_NAME)
    foreign = []
    for p in sorted(out.iterdir()):
        name = p.name
        if name.startswith(".") and any(name.startswith(f".{o}.") for o in ours):
            continue  # a temporary of ours (cleaned by _clean_stale_temps)
        entry = name if name not in ours else _foreign_content(out, p)
        if entry is not None:
            foreign.append(entry)
    return foreign


def _foreign_content(out: Path, p: Path) -> str | None:
    """How to name `p`, one of train()'s own names in `out`, when it holds something train() did
    not write; None when it is train()'s."""
    name = p.name
    if name == CHECKPOINT:
        return _foreign_checkpoint(p)
    if name == BEST:
        return None if _is_our_saved_model(p) else f"{name}/"
    if name == HISTORY_NAME:
        return None if _is_training_history(p) else name
    if p.is_symlink() or not p.is_file():
        return name
    if name == WEIGHTS_NAME and not (out / CHECKPOINT).is_dir() and not _is_our_model_config(out / CONFIG_NAME):
        return name  # weights with neither our config nor a checkpoint: not a run's model
    return None


def _folder_names(p: Path) -> set[str] | None:
    """The names in the real folder `p`; None when `p` is a file or a link."""
    return {q.name for q in p.iterdir()} if p.is_dir() and not p.is_symlink() else None


def _foreign_checkpoint(p: Path) -> str | None:
    """None when `p` is a checkpoint folder: a training state and nothing but a checkpoint's files."""
    inside = _folder_names(p)
    if inside is None or STATE_NAME not in inside or inside - {STATE_NAME, OPTIMIZER_NAME, "model"}:
        return f"{p.name}/" + (", ".join(sorted(inside - {STATE_NAME, OPTIMIZER_NAME, "model"})) if inside else "")
    return None


def _is_our_saved_model(p: Path) -> bool:
    inside = _folder_names(p)
    return not (inside is None or inside - {CONFIG_NAME, WEIGHTS_NAME} or not _is_our_model_config(p / CONFIG_NAME))


def _is_training_history(p: Path) -> bool:
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "settings" in doc and "history" in doc


def _is_our_model_config(p: Path) -> bool:
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _clean_stale_temps(out: Path) -> None:
    """Remove what a killed run may have left (ours only: '.<name>.*.tmp' of dead processes, '.<name>.old')."""
    for name in (CHECKPOINT, WEIGHTS_NAME, CONFIG_NAME, HISTORY_NAME, BEST):
        clean_interrupted_write(out / name)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def _describe_data(data) -> str:
    if isinstance(data, str):
        return data
    ds = getattr(data, "dataset", data)
    return f"{getattr(ds, 'name', type(ds).__name__)}:{getattr(ds, 'split', '?')} ({len(ds)} images)"


@dataclass(frozen=True)
class TrainSettings:
    """How a model is trained (the recipe: everything that changes the weights), checked when built.

    epochs at peak learning rate `lr` after a linear warm-up of `warmup_epochs`, then a cosine decay;
    AdamW with `weight_decay` (not on biases and BatchNorm); `batch_size` images a step (the global
    batch under torchrun; sync_bn normalises over it); cross-entropy with `label_smoothing`;
    distillation weight and temperature (used with a teacher); gradient clipping at max_grad_norm;
    random-crop augmentation of a spec's train split; max_steps_per_epoch cuts epochs short; seed;
    threads: torch's CPU threads while training (None: as set; recorded, it changes the weights);
    amp: mixed precision (CUDA only); workers: data-loading processes; eval_batch_size."""
    epochs: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    batch_size: int = 64
    label_smoothing: float = 0.1
    seed: int = 0
    kd_weight: float = 0.5
    kd_temperature: float = 4.0
    max_grad_norm: float | None = None
    augment: bool = True
    max_steps_per_epoch: int | None = None
    eval_batch_size: int = 256
    amp: bool = True
    sync_bn: bool = False
    threads: int | None = None
    workers: int = 0

    def __post_init__(self):
        checked = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("augment", "amp", "sync_bn")}
        check_training_settings(**checked)

    @classmethod
    def split(cls, epochs: int, **kwargs) -> tuple["TrainSettings", dict]:
        """(the settings the recipe keywords among kwargs give, the other keywords): what turns the
        keywords train() took before TrainSettings into the call it takes now."""
        names = {f.name for f in fields(cls)}
        return cls(epochs, **{k: v for k, v in kwargs.items() if k in names}), \
            {k: v for k, v in kwargs.items() if k not in names}


FINETUNE_DEFAULTS = {"lr": 1e-4, "warmup_epochs": 0.0}  # what finetune() changes in TrainSettings' defaults


@renamed_arguments(out_dir="output", overwrite="force")
def train(model: nn.Module, data, settings: TrainSettings | int, *, teacher: nn.Module | None = None, val_data=None,
          device="cpu", output: str | os.PathLike | None = None, resume: bool = False, force: bool = False,
          progress: bool = True, **recipe) -> tuple[nn.Module, list[dict]]:
    """Train `model` in place as `settings` say (a TrainSettings, or an epoch count with its
    defaults) and return (model, history).

    data: a spec string ("mnist5k", "cifar10:DIR", ...: trains on its "train" split, with
    augmentation when settings.augment, and measures the "calib" split after every epoch), or a
    Dataset (then `val_data`, if given, is measured each epoch). teacher: distil from this model's
    logits (see kd_loss). output: write checkpoints (layout in the module docstring); `resume`
    continues the run found there; `force` replaces a finished or different run. Under torchrun
    (spikeprune.distributed): DDP, only rank 0 writes output. The model (and teacher, put in eval
    mode) move to `device`. recipe: TrainSettings' fields as keywords, the call before
    TrainSettings (deprecated: a FutureWarning; they stop working in the next version).
    Raises SpikepruneError when the loss becomes NaN/inf, keeping the last good checkpoint and
    restoring its weights into `model`.
    """
    s = _settings_of(settings, recipe)
    if resume and output is None:
        raise SpikepruneError("resume needs the output folder of the interrupted run (output / -o)")
    check_finite(model, "the model to train")
    if teacher is not None:
        check_finite(teacher, "the teacher")
        check_teacher_fits(teacher, model)
    if output is not None:  # rank 0 checks (and cleans) the folder; its verdict reaches every process
        distributed.from_main(lambda: check_output_folder(output, resume=resume, force=force),
                              "checking the output folder")
    dev = _device(device)
    train_ds, val_data = _training_data(model, data, val_data, s.augment)
    steps_per_epoch = len(make_loader(train_ds, s.batch_size, shuffle=True, drop_last=True))
    if s.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, int(s.max_steps_per_epoch))
    record = _recorded_settings(s, data, teacher is not None, dev)

    model.to(dev)
    if teacher is not None:
        teacher.to(dev).eval()
    opt = _optimizer(model, s)
    amp_dtype = _amp_dtype(dev, s.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    out = Path(output) if output is not None else None
    created_out = out is not None and distributed.is_main() and not out.exists()
    start_epoch, history, best = 0, [], None
    if out is not None and distributed.is_main():  # check_output_folder has vetted it; only rank 0 writes
        start_epoch, history, best = _open_output(out, resume, force, progress, model, opt, scaler, record,
                                                  s.epochs, dev)
    start_epoch, history, best = distributed.share_training_state(start_epoch, history, best, opt, scaler)
    net, unwrap = distributed.data_parallel(model, dev, s.sync_bn)  # `model` stays the plain module
    run = _Epochs(model, net, train_ds, val_data, s, _loss_fn(teacher, s), opt, scaler, steps_per_epoch, dev,
                  amp_dtype, progress, out, record)
    previous_threads = torch.get_num_threads()
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    try:
        for epoch in range(start_epoch, s.epochs):
            best = run.epoch(epoch, history, best)
    except BaseException:
        if out is not None and created_out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that saved nothing leaves no empty folder behind
        raise
    finally:
        unwrap()
        torch.set_num_threads(previous_threads)
    return model, history


def _settings_of(settings, recipe: dict) -> TrainSettings:
    """The TrainSettings of a train() call: given, or an epoch count, with the deprecated keywords."""
    names = {f.name for f in fields(TrainSettings)}
    unknown = sorted(set(recipe) - names)
    if unknown:
        raise TypeError(f"train() got an unexpected keyword argument {unknown[0]!r}")
    if recipe:
        warnings.warn(deprecation(f"train({', '.join(f'{k}=' for k in recipe)}...)",
                                  "train(model, data, TrainSettings(epochs, ...))"), FutureWarning, stacklevel=3)
    if isinstance(settings, TrainSettings):
        return replace(settings, **recipe) if recipe else settings
    if isinstance(settings, bool) or not isinstance(settings, int):
        raise SpikepruneError(f"train() takes a TrainSettings (or an epoch count), got {type(settings).__name__}")
    return TrainSettings(settings, **recipe)


def _training_data(model, data, val_data, augment: bool):
    """(the training Dataset, what is measured after each epoch or None)."""
    if isinstance(data, str):
        train_ds = dataset_for_model(data, model, "train", augment=augment)
        val_data = dataset_for_model(data, model, "calib") if val_data is None else val_data
    elif isinstance(data, Dataset):
        train_ds = data
    else:
        raise SpikepruneError(f"train() takes a dataset spec or a Dataset, not {type(data).__name__}")
    if isinstance(val_data, str):
        val_data = dataset_for_model(val_data, model, "calib")
    return train_ds, val_data


def _recorded_settings(s: TrainSettings, data, distil: bool, dev: torch.device) -> dict:
    """The settings a run's checkpoints and history.json record (a resume compares them)."""
    return dict(data=_describe_data(data), epochs=s.epochs, lr=s.lr, weight_decay=s.weight_decay,
                warmup_epochs=s.warmup_epochs, batch_size=s.batch_size, label_smoothing=s.label_smoothing,
                seed=s.seed, max_grad_norm=s.max_grad_norm, augment=s.augment, teacher=distil,
                kd_weight=s.kd_weight if distil else None, kd_temperature=s.kd_temperature if distil else None,
                max_steps_per_epoch=s.max_steps_per_epoch,
                torch_threads=(s.threads or torch.get_num_threads()) if dev.type == "cpu" else None)


def _optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    # No weight decay on biases and BatchNorm parameters (1-D tensors), as usual for transformers.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=s.lr)


def _open_output(out: Path, resume: bool, force: bool, progress: bool, model, opt, scaler, record: dict, epochs: int,
                 dev) -> tuple[int, list, dict | None]:
    """Rank 0 opens the output folder: resumes the run found there, or replaces it (force), or starts.
    Returns (epochs done, history, best)."""
    out.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(out)
    found = _read_checkpoint(out)
    if found and resume:
        return _resume(out, found, model, opt, scaler, record, epochs, dev)
    if found or (out / CONFIG_NAME).exists():
        if not force:
            raise SpikepruneError(f"{out} already holds a training run; pass --resume to continue it, "
                                  "--force to replace it, or choose another folder")
        for name in (CHECKPOINT, CONFIG_NAME, WEIGHTS_NAME, HISTORY_NAME, BEST):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    elif resume and progress:
        tqdm.write(f"nothing to resume in {out}: starting a new run", file=sys.stderr)
    return 0, [], None


def _loss_fn(teacher: nn.Module | None, s: TrainSettings):
    def loss_fn(images, logits, labels):
        if teacher is None:
            return F.cross_entropy(logits, labels, label_smoothing=s.label_smoothing)
        with torch.no_grad():
            t_logits = teacher(images).float()
        return kd_loss(logits, t_logits, labels, s.kd_weight, s.kd_temperature, s.label_smoothing)
    return loss_fn


class _Epochs:
    """One training run's epochs: train, measure, keep the best, checkpoint, report."""

    def __init__(self, model, net, train_ds, val_data, s: TrainSettings, loss_fn, opt, scaler, steps: int, dev,
                 amp_dtype, progress: bool, out: Path | None, record: dict):
        self.model, self.net, self.train_ds, self.val_data, self.s = model, net, train_ds, val_data, s
        self.loss_fn, self.opt, self.scaler, self.steps, self.dev = loss_fn, opt, scaler, steps, dev
        self.amp_dtype, self.progress, self.out, self.record = amp_dtype, progress, out, record
        total = s.epochs * steps
        warmup = round(s.warmup_epochs * steps)
        self.schedule = lambda step: lr_at(step, total, warmup, s.lr)
        self.writes = out is not None and distributed.is_main()

    def epoch(self, epoch: int, history: list, best: dict | None) -> dict | None:
        """Run one epoch, append its record to history; returns the best epoch so far."""
        s, t0 = self.s, time.time()
        torch.manual_seed(_epoch_seed(s.seed, epoch))  # augmentation draws
        loader = distributed.shard_train_loader(make_loader(
            self.train_ds, s.batch_size, shuffle=True, seed=_epoch_seed(s.seed, epoch), workers=s.workers,
            drop_last=True))
        record = _train_epoch(self.net, loader, self.loss_fn, self.opt, self.scaler, self.schedule, epoch, s.epochs,
                              self.steps, self.dev, self.amp_dtype, s.max_grad_norm, self.progress, self.out)
        record.update(calib_top1=None, calib_top5=None, calib_loss=None)
        if self.val_data is not None:
            best = self._measure(epoch, record, best)
        record["seconds"] = round(time.time() - t0, 2)
        history.append(record)
        if self.progress:
            calib = f"  calib top-1 {record['calib_top1']:.2%}" if record["calib_top1"] is not None else ""
            tqdm.write(f"epoch {epoch + 1}/{s.epochs}  loss {record['train_loss']:.4f}  train top-1 "
                       f"{record['train_top1']:.2%}{calib}  ({record['seconds']:.0f} s)", file=sys.stderr)
        if self.writes:
            state = {"format": STATE_FORMAT, "version": 1, "epoch": epoch + 1,
                     "step": (epoch + 1) * self.steps, "settings": self.record,
                     "seed_rule": "torch.manual_seed and shuffle seed = seed * 100003 + epoch",
                     "best": best, "history": history}
            doc = {"settings": self.record, "epochs_done": epoch + 1, "best": best, "history": history}
            _write_checkpoint(self.out, self.model, self.opt, self.scaler, state, doc)
        return best

    def _measure(self, epoch: int, record: dict, best: dict | None) -> dict | None:
        m = evaluate(self.model, self.val_data, split="calib", batch_size=self.s.eval_batch_size, device=self.dev,
                     progress=self.progress, amp=self.s.amp)
        record.update(calib_top1=m["top1"], calib_top5=m["top5"], calib_loss=m["loss"])
        if best is None or m["top1"] > best["calib_top1"]:
            best = {"epoch": epoch + 1, "calib_top1": m["top1"]}
            if self.writes:
                with atomic_path(self.out / BEST, is_dir=True) as tmp:
                    save_model(self.model, tmp, extra={"epochs_trained": epoch + 1, "data": self.record["data"],
                                                       "calib_top1": m["top1"]})
        return best


def _train_epoch(model, loader, loss_fn, opt, scaler, schedule, epoch, epochs, steps, dev, amp_dtype,
                 max_grad_norm, progress, out) -> dict:
    """One pass over `loader` (at most `steps` batches); returns the epoch's training metrics."""
    model.train()
    loss_sum, hits, seen, cur_lr = 0.0, 0, 0, None
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False,
               file=sys.stderr, dynamic_ncols=True)
    for i, (images, labels) in enumerate(bar):
        if i >= steps:
            break
        cur_lr = schedule(epoch * steps + i)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
        with _autocast(dev, amp_dtype):
            logits = model(images).float()
            loss = loss_fn(images, logits, labels)
        loss_value = distributed.mean_over_processes(loss.item())
        if not math.isfinite(loss_value):
            bar.close()
            _non_finite(out, model, loss_value, epoch, i, cur_lr, dev)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if max_grad_norm:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(opt)
        scaler.update()
        loss_sum += loss_value * len(labels)
        hits += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{hits / seen:.3f}", lr=f"{cur_lr:.2e}", refresh=False)
    bar.close()
    hits_all, seen_all = distributed.sum_exact(hits, seen)
    return {"epoch": epoch + 1, "lr": cur_lr, "train_loss": loss_sum / seen, "train_top1": hits_all / seen_all}


def _resume(out: Path, found, model, opt, scaler, settings: dict, epochs: int, dev) -> tuple[int, list, dict]:
    ckpt, state = found
    saved = load_model(ckpt / "model")
    if saved.config_dict() != model.config_dict():
        raise SpikepruneError(f"the model in {ckpt} has a different architecture than the one given; resume "
                              "with the same MODEL (and --set options) as the interrupted run")
    model.load_state_dict(saved.state_dict())
    model.to(dev)
    _optimizer_from_files(opt, read_safetensors(ckpt / OPTIMIZER_NAME, str(dev)), state["optimizer"])
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    done = int(state["epoch"])
    if done > epochs:
        raise SpikepruneError(f"{out} has already trained {done} epochs, more than the {epochs} asked for")
    changed = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
    if changed:
        # Allowed (e.g. a lower lr after a NaN), but then the run no longer equals an uninterrupted one.
        tqdm.write("resuming with changed settings: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()),
                   file=sys.stderr)
    return done, list(state["history"]), state.get("best")


def _non_finite(out, model, value, epoch, step, lr, dev):
    found = _read_checkpoint(out) if out is not None else None
    if found:
        model.load_state_dict(load_model(found[0] / "model").state_dict())
        model.to(dev)
        kept = f"the last good checkpoint (epoch {found[1]['epoch']}) is kept in {out} and its weights restored"
    else:
        kept = "no epoch had completed, so nothing was saved"
    raise SpikepruneError(
        f"training stopped: the loss became {value} at epoch {epoch + 1}, step {step + 1} (lr {lr:.3g}); {kept}. "
        "Try a lower --lr (e.g. half), gradient clipping (--max-grad-norm 1), a longer --warmup-epochs or --no-amp, "
        "then --resume or start again")


@renamed_arguments(out_dir="output", overwrite="force")
def finetune(model: nn.Module, data, epochs: int, teacher: nn.Module | None = None, kd_weight: float = 0.5,
             kd_temperature: float = 4.0, lr: float = 1e-4, warmup_epochs: float = 0.0, **kwargs):
    """Fine-tune (e.g. a pruned model) with train(): a lower peak lr, no warm-up, and knowledge
    distillation from `teacher` (e.g. the dense model) when given. kwargs: TrainSettings' other
    fields and train()'s own keywords (output, device, ...). Returns (model, history)."""
    settings, rest = TrainSettings.split(epochs, lr=lr, warmup_epochs=warmup_epochs, kd_weight=kd_weight,
                                         kd_temperature=kd_temperature, **kwargs)
    return train(model, data, settings, teacher=teacher, **rest)
