"""What a model costs: parameters, weight memory, MACs, SOPs, energy and latency, per layer and in total.

Definitions (they are also returned in `notes`, so every report carries them):

* Layers: the model family's cost table (its `layer_table`): every Conv/Linear, named as in the
  state dict (block.0.attn.q_conv, ...), with the BatchNorm that follows it attributed to it, plus
  rows for weightless products (Spikformer: one `attn.matmul` row per block for q @ (k^T @ v)).
  Family-specific notes (Spikformer: its unused norm1/norm2 LayerNorms are not built nor counted)
  come first in `notes`.
* Parameters: trainable tensors only. BatchNorm running statistics are buffers: they fold into the
  preceding weights at inference and are not counted.
* Weight memory: fp32 = 4 B and fp16 = 2 B per parameter; int8 = 1 B per Conv/Linear weight with
  biases and BatchNorm affine parameters kept at fp32 (4 B), the usual int8 deployment.
  Quantisation scales are not counted.
* MACs per image for one forward over all T time steps, as the reference code executes them:
  Conv k^2 * H_out * W_out * C_in * C_out, Linear in * out per token, each run T times; the head
  runs once on the time- and token-averaged features; attention 2 * N * d_qk * d_v per head and step,
  in the order we compute it, q @ (k^T @ v) (the CIFAR reference's (q @ k^T) @ v costs 2 * N^2 * d).
* SOPs (given data): rate * MACs for a layer whose input is spikes, with rate the measured mean of
  its input (a max-pooled spike map is still binary). The attention row: every q spike adds one row
  of k^T v and every k spike one row of v, so SOPs = (rate_q + rate_k) / 2 * MACs (a weightless
  row takes the mean output rate of its `rate_from` modules). Inputs that are not spikes are not
  SOPs (Spikformer: the first conv, q/k/v and fc1, which read the residual stream of spike sums,
  and the head).
* Energy (spec, 45 nm): E = E_MAC * MACs(first conv, once: its input is the same image at every
  step) + E_MAC * MACs(the other non-spike-input layers) + E_AC * SOPs(spike-input layers), with
  E_MAC = 4.6 pJ and E_AC = 0.9 pJ; BatchNorm, LIF, pooling and residual additions are not charged.
* Latency: eval mode, torch.no_grad, `warmup` untimed forwards, then the median of `repeats` timed
  forwards of a batch of `latency_batch` images on `device` (CUDA is synchronised around each).

`count_params`, `memory_bytes`, `count_macs` and `layer_table` are cheap (computed from the
config's widths, no forward pass) and accept a model or a config, for pruning code that asks often.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, Subset

from .data import dataset_for_model
from .errors import SpikepruneError
from .models import get_family
from .serialization import check_finite
from .structure import Layer
from .units import format_bytes, format_count
from .validation import renamed_arguments

E_MAC_PJ = 4.6  # energy of one 32-bit multiply-accumulate, 45 nm (Horowitz 2014), as the spec uses
E_AC_PJ = 0.9  # energy of one 32-bit accumulate
PJ_TO_MJ = 1e-9

NOTES = [
    ("params: trainable tensors only; BatchNorm running statistics (buffers) fold into the weights at "
     "inference and are not counted"),
    ("memory: fp32 4 B, fp16 2 B per parameter; int8 1 B per Conv/Linear weight, biases and BatchNorm "
     "affine parameters kept at fp32 (4 B); quantisation scales not counted"),
    ("MACs: per image, one forward over all T steps as the reference executes it (Conv "
     "k^2*H_out*W_out*C_in*C_out, Linear in*out per token, each T times)"),
    ("SOPs: input firing rate x MACs, for layers whose input is spikes; a weightless spike product (e.g. "
     "attention) takes the mean output rate of the modules that feed it"),
    ("energy: E_MAC=4.6 pJ x (first-conv MACs once per image, its input repeats identically over T, + MACs"
     " of the other non-spike-input layers) + E_AC=0.9 pJ x SOPs; BatchNorm, LIF, pooling and additions "
     "not charged"),
]


# ------------------------------------------------------------------------------------------------
# The layer table: shapes and costs from the config's widths alone (the model family builds it)
# ------------------------------------------------------------------------------------------------
def _config(model_or_config):
    """The config object of a model, a config object, or a `config_dict()`-style dict."""
    if isinstance(model_or_config, dict):
        return get_family(model_or_config).config_class.from_dict(model_or_config.get("config", model_or_config))
    cfg = getattr(model_or_config, "cfg", model_or_config)
    get_family(cfg)  # a clear error for anything that is not a registered family's model or config
    return cfg


def layer_table(model_or_config) -> list[Layer]:
    """Every weight layer (and weightless products such as attention) in forward order, with its cost."""
    cfg = _config(model_or_config)
    return get_family(cfg).layer_table(cfg)


def count_params(model_or_config) -> int:
    """Trainable parameters (the unused reference LayerNorms are not built, so not counted)."""
    return sum(r.params for r in layer_table(model_or_config))


def memory_bytes(model_or_config) -> dict:
    """Weight memory in bytes at fp32 / fp16 / int8 (see the module docstring for int8)."""
    out = {"fp32": 0, "fp16": 0, "int8": 0}
    for r in layer_table(model_or_config):
        for k, v in r.memory_bytes().items():
            out[k] += v
    return out


def count_macs(model_or_config) -> int:
    """MACs per image of one forward over all T steps (attention products included)."""
    return sum(r.macs for r in layer_table(model_or_config))


def deployed_memory_bytes(model_or_config) -> dict:
    """Weight bytes an exported file stores, by precision, from the cost table (BatchNorm folded):
    each weight layer keeps its weights and one bias per output channel when it had a bias or a
    folded BatchNorm. fp32 4 B, fp16 2 B per value; int8 1 B per weight plus, per output channel,
    a 4 B fp32 bias, a 4 B fp32 scale and a 1 B zero point. Graph structure is not counted."""
    out = {"fp32": 0, "fp16": 0, "int8": 0, "params": 0}
    for r in layer_table(model_or_config):
        if not r.weight_shape:
            continue
        channels = r.weight_shape[0]
        biases = channels if (r.bias or r.bn) else 0
        out["params"] += r.weights + biases
        out["fp32"] += 4 * (r.weights + biases)
        out["fp16"] += 2 * (r.weights + biases)
        out["int8"] += r.weights + 4 * biases + 4 * channels + channels
    return out


def _check_model_matches_table(model, table: list[Layer]) -> None:
    """The table is computed from the config; make sure the model's layers really have those shapes."""
    modules = dict(model.named_modules())
    for r in table:
        if not r.weight_shape:  # weightless products
            continue
        m = modules.get(r.name)
        if m is None or tuple(m.weight.shape) != r.weight_shape or (m.bias is not None) != r.bias:
            got = "missing" if m is None else f"{list(m.weight.shape)} bias={m.bias is not None}"
            raise SpikepruneError(f"layer {r.name} is {got} but the model's config says {list(r.weight_shape)} "
                                  f"bias={r.bias}: the model was changed without updating its config")
    n_model = sum(p.numel() for p in model.parameters())
    n_table = sum(r.params for r in table)
    if n_model != n_table:
        raise SpikepruneError(f"the model has {n_model:,} parameters but its config accounts for {n_table:,}")


# ------------------------------------------------------------------------------------------------
# Firing rates from data
# ------------------------------------------------------------------------------------------------
class _InputRecorder(TorchFunctionMode):
    """Sees every linear / conv call during a forward; a call whose weight belongs to a known layer
    adds its input's sum, size and binariness to that layer's tally. It works however forward
    applies the layer (a module call, or one GEMM on a view of the weight)."""

    OPS = (F.linear, F.conv1d, F.conv2d)

    def __init__(self, layer_of_storage: dict[int, str]):
        super().__init__()
        self.layer_of_storage = layer_of_storage
        self.tally: dict[str, list] = {}  # name -> [sum, count, all_binary]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS:
            x = args[0]
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self.layer_of_storage.get(w.untyped_storage().data_ptr()) if w is not None else None
            if name is not None:
                t = self.tally.setdefault(name, [0.0, 0, True])
                t[0] += float(x.sum(dtype=torch.float64))
                t[1] += x.numel()
                t[2] = t[2] and bool(((x == 0) | (x == 1)).all())
        return func(*args, **kwargs)


def _image_batches(data, model, n_images: int, batch_size: int, split: str):
    """Yield image batches [B, C, H, W] (at most n_images in all) from a spec, Dataset, loader or tensor."""
    if isinstance(data, str):
        data = dataset_for_model(data, model, split=split)
    if isinstance(data, torch.Tensor):
        source = (data[i:i + batch_size] for i in range(0, min(len(data), n_images), batch_size))
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):  # a Dataset of (image, label)
        source = DataLoader(Subset(data, range(min(len(data), n_images))), batch_size=batch_size)
    else:  # any iterable of batches, e.g. a DataLoader
        source = data
    seen = 0
    for batch in source:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        images = images[: n_images - seen]
        if len(images):
            yield images
            seen += len(images)
        if seen >= n_images:
            break


def _input_rates(model, table: list[Layer], batches, device) -> tuple[dict, int]:
    """Mean input of every weight layer, and each block's q / k firing rates, over the batches."""
    storage = {}
    modules = dict(model.named_modules())
    for r in table:
        if r.weight_shape:
            storage[modules[r.name].weight.untyped_storage().data_ptr()] = r.name
    out_sums: dict[str, list] = {}  # module -> [sum, count] of its outputs (the rate_from modules)
    hooks = []
    for source in sorted({m for r in table for m in r.rate_from}):
        def hook(_m, _i, out, key=source):
            t = out_sums.setdefault(key, [0.0, 0])
            t[0] += float(out.sum(dtype=torch.float64))
            t[1] += out.numel()

        hooks.append(modules[source].register_forward_hook(hook))
    recorder = _InputRecorder(storage)
    n = 0
    cfg = model.cfg
    try:
        with torch.no_grad():
            for images in batches:
                if images.dim() != 4 or tuple(images.shape[1:]) != (cfg.in_channels, cfg.img_size, cfg.img_size):
                    raise SpikepruneError(
                        f"data images are {list(images.shape[1:])} but the model takes "
                        f"[{cfg.in_channels}, {cfg.img_size}, {cfg.img_size}]; load the data at the model's size")
                with recorder:
                    model(images.to(device))
                n += len(images)
    finally:
        for h in hooks:
            h.remove()
    if n == 0:
        raise SpikepruneError("the data gave no images to measure firing rates on")
    rates = {name: (s / c, binary) for name, (s, c, binary) in recorder.tally.items()}
    for r in table:
        if r.rate_from:  # a weightless product: the mean of its sources' output rates
            rates[r.name] = (sum(out_sums[m][0] / out_sums[m][1] for m in r.rate_from) / len(r.rate_from), True)
    return rates, n


# ------------------------------------------------------------------------------------------------
# Latency
# ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model, images: torch.Tensor, repeats: int = 20, warmup: int = 3) -> list[float]:
    """Wall-clock seconds of `repeats` eval-mode, no-grad forwards of `images` (after `warmup` untimed ones)."""
    device = images.device
    with torch.no_grad():
        for _ in range(warmup):
            model(images)
        _sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(images)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times


LATENCY_SPREAD_LIMIT = 0.25  # interquartile range over the median above which a latency figure is unreliable
LATENCY_LOAD_LIMIT = 1.0  # runnable processes per CPU (1-minute load average) above which timings are unreliable


def _load_per_cpu() -> float | None:
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (OSError, AttributeError):  # not on every platform
        return None


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def interleaved_latency(models: dict, images: torch.Tensor, repeats: int = 10, warmup: int = 2) -> dict:
    """Time several models on the same images interleaved -- round r runs each model once, the order
    rotating every round -- so that a change in the machine's load hits every model alike, instead
    of the one that happened to be timed while something else ran. Returns, per model name:
    latency_ms (the median), latency_ms_q1 / q3, latency_spread ((q3 - q1) / median), and for all of
    them `load_per_cpu` (the 1-minute load average per CPU, before and after, the larger) and
    `reliable`: False when a model's spread exceeds LATENCY_SPREAD_LIMIT or, on the CPU, the load
    exceeds LATENCY_LOAD_LIMIT (other processes competed for the CPU), with `why`."""
    names = list(models)
    device = images.device
    load_before = _load_per_cpu() if device.type == "cpu" else None
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for n in names:
            for _ in range(warmup):
                models[n](images)
        _sync(device)
        for r in range(repeats):
            for n in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                models[n](images)
                _sync(device)
                times[n].append(time.perf_counter() - t0)
    load_after = _load_per_cpu() if device.type == "cpu" else None
    loads = [x for x in (load_before, load_after) if x is not None]
    load = max(loads) if loads else None
    out, why = {}, []
    for n in names:
        q1, med, q3 = _quartiles(times[n])
        spread = (q3 - q1) / med if med > 0 else 0.0
        out[n] = {"latency_ms": 1e3 * med, "latency_ms_q1": 1e3 * q1, "latency_ms_q3": 1e3 * q3,
                  "latency_spread": spread, "latency_repeats": repeats}
        if spread > LATENCY_SPREAD_LIMIT:
            why.append(f"the {n} model's timings spread {spread:.0%} of their median (limit "
                       f"{LATENCY_SPREAD_LIMIT:.0%})")
    if load is not None and load > LATENCY_LOAD_LIMIT:
        why.append(f"the machine was busy ({load:.2f} runnable processes per CPU, limit {LATENCY_LOAD_LIMIT:g})")
    return {"models": out, "load_per_cpu": load, "reliable": not why, "why": why, "interleaved": True,
            "batch": int(images.shape[0]), "device": str(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else None}


# ------------------------------------------------------------------------------------------------
# measure()
# ------------------------------------------------------------------------------------------------
def _device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpikepruneError("--device cuda was asked for but no CUDA GPU is available here; use --device cpu")
    return device


@renamed_arguments(n_images="max_images")
def measure(model, data=None, device="cpu", max_images: int = 256, batch_size: int = 64, latency: bool = True,
            latency_batch: int = 1, repeats: int = 20, warmup: int = 3, split: str = "test") -> dict:
    """Per-layer and total cost of `model`; see the module docstring for every definition.

    data: a dataset spec ("mnist5k", "cifar10:DIR", ...; its `split` is used), a Dataset, a
      DataLoader or a tensor of images. It gives the firing rates behind SOPs and energy; without it
      those are None. The first `max_images` images are used.
    Returns {"total": {...}, "layers": [{...}, ...], "notes": [...]}, plain JSON-able data.
    """
    if max_images < 1 or batch_size < 1 or latency_batch < 1 or repeats < 1 or warmup < 0:
        raise SpikepruneError("max_images, batch_size, latency_batch and repeats must be at least 1 (warmup >= 0)")
    check_finite(model, "the model to measure")  # NaN weights would still give plausible-looking costs
    table = layer_table(model)
    _check_model_matches_table(model, table)
    dev = _device(device)
    cfg = model.cfg
    first = next(model.parameters())
    home, was_training = first.device, model.training
    model.to(dev).eval()
    try:
        rates, n_rate_images = ({}, 0) if data is None else _checked_rates(
            model, table, _image_batches(data, model, max_images, batch_size, split), dev)
        times = None
        if latency:
            x = torch.rand(latency_batch, cfg.in_channels, cfg.img_size, cfg.img_size, device=dev)
            times = time_forward(model, x, repeats, warmup)
    finally:
        model.to(home).train(was_training)

    notes = [*get_family(model).cost_notes, *NOTES]
    layers = [_layer_row(r, rates if data is not None else None, cfg.T, notes) for r in table]
    total = _totals(layers, cfg.T, n_rate_images, with_rates=data is not None)
    if data is None:
        notes.append("no data given: SOPs and energy need firing rates (pass data=..., or --data on the command line)")
    if times is not None:
        total.update(latency_ms=1e3 * statistics.median(times), latency_ms_min=1e3 * min(times),
                     latency_batch=latency_batch, latency_repeats=repeats, latency_device=str(dev),
                     latency_threads=torch.get_num_threads() if dev.type == "cpu" else None)
        notes.append(f"latency: eval mode, no_grad, {warmup} warm-up then median of {repeats} forwards of a batch "
                     f"of {latency_batch} on {dev}")
    return {"total": total, "layers": layers, "notes": notes}


def _checked_rates(model, table, batches, dev) -> tuple[dict, int]:
    """(_input_rates of the spiking layers, images seen); a NaN or Inf input is an error."""
    rates, n = _input_rates(model, table, batches, dev)
    bad = [name for name, (rate, _) in rates.items() if not torch.isfinite(torch.tensor(float(rate)))]
    if bad:
        raise SpikepruneError(f"the model computed NaN or Inf inputs to {bad[0]}; it cannot be measured")
    return rates, n


def _layer_row(r, rates: dict | None, T: int, notes: list) -> dict:
    """One layer's costs; SOPs and energy from the firing rates (None without them)."""
    row = {"name": r.name, "type": r.type, "params": r.params, "memory_bytes": r.memory_bytes(),
           "macs": r.macs, "input": r.input, "op": "AC" if r.input == "spikes" else "MAC",
           "input_rate": None, "sops": None, "energy_mj": None}
    if rates is None:
        return row
    if r.input == "spikes":
        rate, binary = rates[r.name]
        if not binary:  # would mean the forward no longer feeds this layer spikes
            notes.append(f"warning: {r.name} was expected to read spikes but saw other values")
        row["input_rate"] = rate
        row["sops"] = rate * r.macs
        row["energy_mj"] = E_AC_PJ * row["sops"] * PJ_TO_MJ
    else:
        once = r.macs // T if r.input == "image" else r.macs
        row["energy_mj"] = E_MAC_PJ * once * PJ_TO_MJ
    return row


def _totals(layers: list[dict], T: int, n_rate_images: int, with_rates: bool) -> dict:
    mem = {k: sum(row["memory_bytes"][k] for row in layers) for k in ("fp32", "fp16", "int8")}
    total = {"params": sum(row["params"] for row in layers), "memory_bytes": mem,
             "macs": sum(row["macs"] for row in layers), "sops": None, "energy_mj": None,
             "latency_ms": None, "T": T, "rate_images": n_rate_images}
    if with_rates:
        total["sops"] = sum(row["sops"] for row in layers if row["sops"] is not None)
        total["energy_mj"] = sum(row["energy_mj"] for row in layers)
        total["mean_input_rate"] = total["sops"] / sum(row["macs"] for row in layers if row["op"] == "AC")
    return total


# ------------------------------------------------------------------------------------------------
# The report as text
# ------------------------------------------------------------------------------------------------
def _si(x, unit: str = "") -> str:
    return format_count(x, digits=3, significant=True, unit=unit)


def _mb(n: int) -> str:
    return "-" if n == 0 else format_bytes(n, digits=3)


def format_report(report: dict) -> str:
    """The per-layer table and the totals as fixed-width text."""
    head = (f"{'layer':28s} {'type':11s} {'params':>8s} {'fp32 mem':>10s} {'MACs':>8s} {'input':>6s} "
            f"{'rate':>6s} {'SOPs':>8s} {'energy uJ':>10s}")
    lines = [head, "-" * len(head)]
    for r in report["layers"]:
        rate = "-" if r["input_rate"] is None else f"{r['input_rate']:.3f}"
        energy = "-" if r["energy_mj"] is None else f"{r['energy_mj'] * 1e3:.4g}"
        lines.append(f"{r['name']:28s} {r['type']:11s} {_si(r['params']):>8s} {_mb(r['memory_bytes']['fp32']):>10s} "
                     f"{_si(r['macs']):>8s} {r['input']:>6s} {rate:>6s} {_si(r['sops']):>8s} {energy:>10s}")
    t = report["total"]
    m = t["memory_bytes"]
    lines += ["-" * len(head),
              f"params     {t['params'] / 1e6:.4f} M ({t['params']:,})",
              f"memory     fp32 {m['fp32'] / 1e6:.3f} MB | fp16 {m['fp16'] / 1e6:.3f} MB | "
              f"int8 {m['int8'] / 1e6:.3f} MB",
              f"MACs       {t['macs'] / 1e9:.4f} G per image (T={t['T']})"]
    if t["sops"] is not None:
        lines += [f"SOPs       {t['sops'] / 1e9:.4f} G per image (mean input rate {t['mean_input_rate']:.3f}, "
                  f"{t['rate_images']} images)",
                  f"energy     {t['energy_mj']:.4f} mJ per image"]
    if t["latency_ms"] is not None:
        lines.append(f"latency    {t['latency_ms']:.2f} ms per forward (batch {t['latency_batch']}, "
                     f"{t['latency_device']}, "
                     f"median of {t['latency_repeats']})")
    lines.append("notes:")
    lines += [f"  - {n}" for n in report["notes"]]
    return "\n".join(lines)
