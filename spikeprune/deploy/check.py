"""The runtime check: ONNX Runtime's outputs of a written file against the PyTorch model it should
compute (the fake-quantised model for int8 / int4 / fp16 weights, behind the same input
normalisation), image by image and spike by spike (see spikeprune.deploy)."""
from __future__ import annotations

import copy
import json

import numpy as np
import torch
from torch import nn

from ..data import dataset_for_model
from ..errors import SpikepruneError
from ..neuron import LIF
from .fold import RawInput, export_reference, float64_check
from .graph import need_onnx

CHECK_IMAGES = 500  # the calibration split of the bundled data is 500 images
RANDOM_CHECK_IMAGES = 32  # without data: random images (the function, not accuracy, is checked)
FLOAT64_IMAGES = 16
CHECK_BATCH = 50
SPIKE_BUDGET = 100_000_000  # fire decisions compared per batch (bool, held by both runtimes)
LOGIT_TOLERANCE = 1e-3  # |logit difference| / (1 + max |logit|) allowed between runtimes with no spike flip


def _static_starts(n: int, batch: int) -> list[tuple[int, int]]:
    """Whole batches of a file traced at a fixed batch size (the images beyond the last are left out)."""
    if n < batch:
        raise SpikepruneError(f"the file takes batches of exactly {batch} images but the check has only {n}: give "
                              f"more check images, or a smaller batch")
    return [(a, a + batch) for a in range(0, n - n % batch, batch)]


def _batch_starts(n: int, batch_size: int, static: int | None = None) -> list[tuple[int, int]]:
    if static:
        return _static_starts(n, static)
    """A batch of one image first, then batch_size ones: the check runs two batch sizes, neither the
    traced one, so the dynamic batch dimension is exercised."""
    bounds = [0, 1] if n > 1 else [0]
    while bounds[-1] < n:
        bounds.append(min(n, bounds[-1] + batch_size))
    return list(zip(bounds[:-1], bounds[1:]))


def check_batches(data, model, split: str, n_images: int, batch_size: int, raw: bool = False,
                  static: int | None = None):
    """(images, labels or None) batches: a dataset spec / Dataset, a tensor of images, or None
    (random images in [0, 1] with a fixed seed). raw: a dataset's images are given back as pixels
    ((x * std + mean), what a file taking raw pixels reads); a tensor is taken as the file's input."""
    cfg = model.cfg
    if data is None:
        g = torch.Generator().manual_seed(0)
        n = min(n_images, RANDOM_CHECK_IMAGES)
        images = torch.rand(n, cfg.in_channels, cfg.img_size, cfg.img_size, generator=g)
        n = max(n, static or 0)
        images = torch.rand(n, cfg.in_channels, cfg.img_size, cfg.img_size, generator=g)
        return [(images[a:b], None) for a, b in _batch_starts(n, batch_size, static)], f"{n} random images"
    if isinstance(data, torch.Tensor):
        images = data[:n_images].float()
        return ([(images[a:b], None) for a, b in _batch_starts(len(images), batch_size, static)],
                f"{len(images)} given images")
    ds = dataset_for_model(data, model, split=split) if isinstance(data, str) else data
    n = min(len(ds), n_images)
    if n == 0:
        raise SpikepruneError("the check data has no images")
    if raw and not (isinstance(getattr(ds, "mean", None), torch.Tensor) and isinstance(getattr(ds, "std", None),
                                                                                     torch.Tensor)):
        raise SpikepruneError("the check data does not say its normalisation (mean / std), so its raw pixels are "
                              "unknown: give a dataset spec, or a tensor of raw images")
    batches = []
    for a, b in _batch_starts(n, batch_size, static):
        idx = list(range(a, b))
        if hasattr(ds, "batch"):
            images, labels = ds.batch(idx)
        else:
            items = [ds[j] for j in idx]
            images, labels = torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items])
        images = images.float()
        if raw:  # the dataset's own pixels where it gives them, else its normalisation undone
            images = ds.pixels(idx).float() if hasattr(ds, "pixels") else images * ds.std.float() + ds.mean.float()
        batches.append((images, labels))
    where = f"{getattr(ds, 'name', 'data')}:{getattr(ds, 'split', split)}"
    return batches, f"{n} {where} images"


def _add_spike_outputs(proto) -> list[bool]:
    """Make every fire decision (a GreaterOrEqual output) an output of the graph, in node order:
    in the main graph as it is; in a Loop's body (a Loop file) as an extra scan output of the
    Loop, [T, ...] with one decision map per step. Returns, per added output, whether it is per step."""
    from onnx import TensorProto, helper  # optional dependency (the `export` extra)

    per_step = []
    for node in list(proto.graph.node):
        if node.op_type == "GreaterOrEqual":
            proto.graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.BOOL, None))
            per_step.append(False)
        body = next((a.g for a in node.attribute if a.name == "body"), None) if node.op_type == "Loop" else None
        for inner in (body.node if body is not None else []):
            if inner.op_type == "GreaterOrEqual":
                body.output.append(helper.make_tensor_value_info(inner.output[0], TensorProto.BOOL, None))
                node.output.append(f"{inner.output[0]}__steps")
                proto.graph.output.append(helper.make_tensor_value_info(node.output[-1], TensorProto.BOOL, None))
                per_step.append(True)
    return per_step


def _step_maps(outs: list[np.ndarray], per_step: list[bool]) -> list[np.ndarray]:
    """The fire decisions in the order of an unrolled file's: per LIF, then per step."""
    maps = []
    for o, steps in zip(outs, per_step):
        maps.extend(list(o) if steps else [o])
    return maps


def _probe_session(path: str, with_spikes: bool, precision: str = "fp32"):
    """An ONNX Runtime session of the file; with_spikes also returns every fire decision as an
    output (_add_spike_outputs: returns which are per step). A file the runtime cannot load (e.g.
    int4 weights on a runtime without int4 DequantizeLinear) is a SpikepruneError naming the
    runtime's version."""
    import onnx  # optional dependency (the `export` extra)
    import onnxruntime as ort  # optional dependency (the `export` extra)

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = torch.get_num_threads()  # as many as torch uses: a fair comparison, no oversubscription
    proto = onnx.load(path)
    per_step = _add_spike_outputs(proto) if with_spikes else []
    try:
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]), per_step
    except Exception as e:  # onnxruntime's own exception types (Fail, NotImplemented, InvalidGraph)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise SpikepruneError(f"ONNX Runtime {ort.__version__} cannot run this {precision} file (opset "
                              f"{max(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx'))}): {first}. "
                              "Choose a precision this runtime takes (int8 needs opset 13's per-channel "
                              "DequantizeLinear, int4 opset 21's int4 one), or a newer runtime") from None


def _membranes(x: torch.Tensor, spikes: torch.Tensor, tau: float) -> torch.Tensor:
    """The LIF's membrane h_t before each fire decision, recomputed in float64 from its input and
    its own spikes (for the distance of a decision to the threshold)."""
    x = x.detach().double()
    hs, v = [], None
    for t in range(x.shape[0]):
        h = x[t] / tau if v is None else v + (x[t] - v) / tau
        hs.append(h)
        v = h - h * (spikes[t] != 0).double()
    return torch.stack(hs)


class _SpikeComparison:
    """Forward hooks on the PyTorch model's LIFs compare each step's spikes with ONNX Runtime's,
    in execution order, and sort the flips into first-in-image ties and downstream ones."""

    def __init__(self, model: nn.Module):
        self.lifs = [m for m in model.modules() if isinstance(m, LIF)]
        self.decisions = self.tie_flips = self.downstream_flips = 0
        self.max_tie_margin = 0.0
        self.comparable = True
        self.note = None
        self.flip_images = 0

    def run(self, model, images, ort_spikes: list[np.ndarray]):
        B = images.shape[0]
        state = {"i": 0, "seen": torch.zeros(B, dtype=torch.bool)}

        def hook(mod, inp, out):
            if not self.comparable:
                return
            membranes = None  # float64, computed only when this LIF has a flip
            for t in range(out.shape[0]):
                if state["i"] >= len(ort_spikes):
                    return self._stop("the graph has fewer fire decisions than the model's LIF steps")
                theirs = torch.from_numpy(ort_spikes[state["i"]])
                state["i"] += 1
                ours = out[t] != 0
                if tuple(theirs.shape) != tuple(ours.shape) or ours.dim() == 0 or ours.shape[0] != B:
                    return self._stop("the graph's fire decisions do not line up with the model's LIF steps")
                diff = ours != theirs
                self.decisions += diff.numel()
                if not bool(diff.any()):
                    continue
                per_image = diff.reshape(B, -1)
                any_b = per_image.any(1)
                first = any_b & ~state["seen"]
                if bool(first.any()):  # identical spikes upstream: a float32 rounding tie
                    if membranes is None:
                        membranes = _membranes(inp[0], out, mod.tau)
                    margins = (membranes[t] - mod.v_threshold).abs().reshape(B, -1)[first][per_image[first]]
                    self.tie_flips += int(per_image[first].sum())
                    self.max_tie_margin = max(self.max_tie_margin, float(margins.max()))
                self.downstream_flips += int(per_image[state["seen"]].sum())
                state["seen"] |= any_b

        hooks = [m.register_forward_hook(hook) for m in self.lifs]
        try:
            with torch.no_grad():
                logits = model(images)
        finally:
            for h in hooks:
                h.remove()
        if self.comparable and state["i"] != len(ort_spikes):
            self._stop("the graph has more fire decisions than the model's LIF steps")
        self.flip_images += int(state["seen"].sum())
        return logits, state["seen"]

    def _stop(self, why: str):
        self.comparable, self.note = False, why


def reference_models(model: nn.Module, meta: dict) -> tuple[nn.Module, nn.Module]:
    """(what the file should compute, the fp32 model) from an exported file's metadata: the model
    itself for an fp32 file; for reduced precision, the fake-quantised model with BatchNorm folded
    (fold.export_reference); for a file taking raw pixels, both behind its input normalisation."""
    fp32 = copy.deepcopy(model).float().cpu().eval()
    plan = json.loads(meta["weight_precision"]) if meta.get("weight_precision") else None
    reference = export_reference(fp32, plan) if plan and set(plan.values()) != {"fp32"} else fp32
    pre = json.loads(meta["preprocessing"]) if meta.get("preprocessing") else {"input": "normalised"}
    if pre.get("input") == "raw":
        same = reference is fp32
        fp32 = RawInput(fp32, pre["mean"], pre["std"]).eval()
        reference = fp32 if same else RawInput(reference, pre["mean"], pre["std"])
    return reference.eval(), fp32


class _Tally:
    """What check_export counts over the batches: class agreement, top-1 hits of the reference,
    the fp32 model and ONNX Runtime, and (where the spikes are comparable) the images whose logits
    or class differ with no spike flipped."""

    def __init__(self):
        self.n = self.agree = self.hit_ref = self.hit_fp32 = self.hit_ort = self.labelled = 0
        self.unexplained = self.wrong_class_clean = 0
        self.max_diff_clean = 0.0
        self.sizes: set[int] = set()

    def add(self, images, labels, ort_logits, logits, flipped, comparable: bool, fp32, reference) -> None:
        if tuple(ort_logits.shape) != tuple(logits.shape):
            raise SpikepruneError(f"the exported graph gives logits {list(ort_logits.shape)} for a batch of "
                                  f"{len(images)}, the model {list(logits.shape)}")
        self.sizes.add(len(images))
        same = ort_logits.argmax(1) == logits.argmax(1)
        self.agree += int(same.sum())
        if comparable:
            clean = ~flipped
            self.wrong_class_clean += int((~same & clean).sum())
            if bool(clean.any()):
                diff = (ort_logits[clean] - logits[clean]).abs().amax(1) / (1 + logits[clean].abs().amax(1))
                self.max_diff_clean = max(self.max_diff_clean, float(diff.max()))
                self.unexplained += int((diff > LOGIT_TOLERANCE).sum())
        if labels is not None:
            self.labelled += len(labels)
            self.hit_ref += int((logits.argmax(1) == labels).sum())
            self.hit_ort += int((ort_logits.argmax(1) == labels).sum())
            if fp32 is reference:
                self.hit_fp32 = self.hit_ref
            else:
                with torch.no_grad():
                    self.hit_fp32 += int((fp32(images).argmax(1) == labels).sum())
        self.n += len(images)

    def report(self, source: str, precision: str, reference_is_fp32: bool, raw: bool) -> dict:
        n, labelled = self.n, self.labelled
        return {"images": n, "source": source, "precision": precision, "class_agreement": self.agree / n,
                "class_disagreements": n - self.agree, "labelled": labelled,
                "hits": {"fp32": self.hit_fp32, "reference": self.hit_ref, "onnx": self.hit_ort} if labelled else None,
                "top1_torch": self.hit_fp32 / labelled if labelled else None,
                "top1_reference": self.hit_ref / labelled if labelled else None,
                "top1_onnx": self.hit_ort / labelled if labelled else None,
                "reference": "the fp32 model" if reference_is_fp32 else
                f"the fake-quantised model ({precision} weights, BatchNorm folded)",
                "input": "raw pixels in [0, 1]" if raw else "normalised images",
                "batch_sizes": sorted(self.sizes)}


def _spike_report(spikes: _SpikeComparison, tally: _Tally, n_decisions: int) -> dict:
    return {"comparable": spikes.comparable, "note": spikes.note, "graph_decisions": n_decisions,
            "decisions": spikes.decisions, "tie_flips": spikes.tie_flips,
            "downstream_flips": spikes.downstream_flips, "images_with_flips": spikes.flip_images,
            "max_tie_margin": spikes.max_tie_margin,
            "max_rel_logit_diff_without_flips": tally.max_diff_clean,
            "images_differing_without_flips": tally.unexplained,
            "class_disagreements_without_flips": tally.wrong_class_clean}


def _refuse_other_function(report: dict, spikes: _SpikeComparison, tally: _Tally) -> None:
    """An error when the file computes another function: logits or classes differing with every
    spike equal, or a top-1 difference larger than the images with a spike flipped at a tie."""
    n = tally.n
    if spikes.comparable and (tally.unexplained or tally.wrong_class_clean):
        raise SpikepruneError(
            f"the exported file computes another function than {report['reference']}: on "
            f"{max(tally.unexplained, tally.wrong_class_clean)} of {n} images its logits differ from PyTorch's by up "
            f"to {tally.max_diff_clean:.3g} (relative) with every spike equal")
    if tally.labelled and spikes.comparable and abs(tally.hit_ref - tally.hit_ort) > spikes.flip_images:
        raise SpikepruneError(f"the exported file's top-1 differs from {report['reference']}'s by "
                              f"{abs(tally.hit_ref - tally.hit_ort)} images, more than the {spikes.flip_images} "
                              "images with a spike flipped at a float32 tie")


def _chunks(batches, first_limit: int):
    """The batches cut to at most limit["images"] images (the caller may lower it after the first)."""
    limit = {"images": first_limit}

    def gen():
        for images, labels in batches:
            for a in range(0, len(images), limit["images"]):
                b = a + limit["images"]
                yield images[a:b], None if labels is None else labels[a:b]
    return gen(), limit


def check_export(path, model: nn.Module, data=None, split: str = "calib", n_images: int = CHECK_IMAGES,
                 batch_size: int = CHECK_BATCH, float64: bool = True) -> dict:
    """ONNX Runtime's outputs of the file at `path` against `model` (see spikeprune.deploy), as the
    file's metadata says it was written: its weight plan (the reference is the fake-quantised
    model) and its input (raw pixels: the images given to the file are a dataset's pixels, and
    the reference normalises them as the file does). `data`: a dataset spec or Dataset (its
    `split`), a tensor of the file's input images, or None (random images). A Loop file's fire
    decisions are read from the Loop as per-step scan outputs. Returns plain data; raises when the
    file computes another function, or ONNX Runtime cannot run it."""
    need_onnx(check=True)
    meta = file_metadata(path)
    precision = meta.get("precision", "fp32")
    reference, fp32 = reference_models(model, meta)
    raw = json.loads(meta.get("preprocessing") or "{}").get("input") == "raw"
    static = int(meta["batch"]) if meta.get("batch", "dynamic") != "dynamic" else None
    batches, source = check_batches(data, model, split, n_images, batch_size, raw=raw, static=static)
    sess, per_step = _probe_session(str(path), with_spikes=True, precision=precision)
    spikes, tally = _SpikeComparison(reference), _Tally()
    chunks, limit = _chunks(batches, static or batch_size)  # limit lowered after the first (one-image) batch
    for images, labels in chunks:
        outs = sess.run(None, {"images": images.numpy()})
        logits, flipped = spikes.run(reference, images, _step_maps(outs[1:], per_step))
        if tally.n == 0:  # every fire decision of a batch is held in memory twice: keep that near SPIKE_BUDGET
            per_image = max(1, sum(o.size for o in outs[1:]) // len(images))
            limit["images"] = static or max(1, min(batch_size, SPIKE_BUDGET // per_image))
        tally.add(images, labels, torch.from_numpy(outs[0]), logits, flipped, spikes.comparable, fp32, reference)
    report = tally.report(source, precision, fp32 is reference, raw)
    n_decisions = sum(int(meta.get("T", 1)) if steps else 1 for steps in per_step)
    report["spikes"] = _spike_report(spikes, tally, n_decisions)
    _refuse_other_function(report, spikes, tally)
    if float64:
        images = torch.cat([b[0] for b in batches])[:FLOAT64_IMAGES]
        base = fp32
        if isinstance(fp32, RawInput):  # the fold is a property of the model; it reads normalised images
            base, images = fp32.model, (images - fp32.mean) / fp32.std
        report["float64"] = float64_check(base, images, f"{FLOAT64_IMAGES} of the {source}")
    return report


def file_metadata(path) -> dict:
    """The spikeprune.* metadata of an exported file (keys without the prefix)."""
    import onnx  # optional dependency (the `export` extra)

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return {k[len("spikeprune."):]: v for k, v in meta.items() if k.startswith("spikeprune.")}
