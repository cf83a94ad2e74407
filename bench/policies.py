"""Every pruning policy side by side on one model: memory saved, accuracy, speed and cost (issue 6).

    python bench/policies.py --quick                 # reduced protocol (fewer ratios and images)
    python bench/policies.py --update-readme         # full protocol on the bundled model and mnist5k
    python bench/policies.py --model spikformer-8-512 --checkpoint FILE --data imagefolder:PATH \\
        --device cuda --max-calib 5000 --max-test 10000 --out bench/results/imagenet

Not a test (tests/test_bench_policies.py runs a tiny configuration of it); bench/README.md says what
every column means. One process, one model, one dataset, one machine:

1. Shared work is computed once, in WORK/shared, and copied into each policy's run folder, where
   the policy's own resume logic reads it back instead of recomputing it. It is *charged* to every
   policy that reads it (a PruneContext subclass notes what each policy reads):
     dense calibration top-1   every policy
     uniform sweep             uniform, psvit (PSViT's step 1)
     sensitivity analysis      psvit, primesvt
2. For each accuracy limit (--limits, default 1 and 3 points, calibration split) and no memory
   target, every policy runs through the registry exactly as `spikeprune prune --policy NAME` runs
   it -- a PruneContext with the same settings and the registered function, nothing reimplemented:
   uniform (largest sweep ratio within the limit), psvit, primesvt, global (policies/global_l2.py),
   and random: the `groups` policy with importance `random` and the per-group widths of PrimeSVT's
   result at that limit -- a floor at PrimeSVT's memory. Every pruned model is then fine-tuned with
   the same budget (train.finetune, as the pipeline calls it; --finetune-epochs, --kd) and measured
   on the test split: top-1 before and after fine-tuning, params, memory, MACs, SOPs, energy.
3. Latency: one interleaved timer over the dense model and every pruned model: each repeat times
   one forward of every model (the order rotated between repeats), so slow spells of a shared
   machine hit all models alike; the median per model; speedup = dense median / model median.
4. Frontier: for each memory target (--targets), every policy runs with --target-saving T under the
   --frontier-limit (default: the largest limit); the model it chose on the calibration split is
   measured on the test split (no fine-tuning). Plot: test top-1 against memory saved.
5. OUT/policies.json, OUT/policies.md, OUT/frontier.png (and, with --update-readme, the table in
   bench/README.md), with the exact command, the machine and the date.

Resume: WORK (default runs/bench-policies/<settings hash>) keeps every finished run; the same
command again reads them back and computes only what is missing. Latency is always measured
afresh, in one session, so that every model is timed under the same conditions.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spikeprune.errors import SpikepruneError  # noqa: E402

FORMAT = "spikeprune-bench-policies"
MAIN_POLICIES = ("uniform", "psvit", "primesvt", "global", "random")
RANDOM = "random"  # the floor: not a registered policy but the `groups` policy with random importance
LABELS = {"uniform": "uniform", "psvit": "PSViT", "primesvt": "PrimeSVT", "global": "global L2",
          "random": "random @ PrimeSVT memory"}
SHARED_STEPS = ("dense_calib", "uniform_sweep")  # checkpoint names (RUN/steps/*.json) shared between runs
README_START, README_END = "<!-- bench-policies:start -->", "<!-- bench-policies:end -->"

# Settings whose default differs between the full protocol and --quick (None in argparse = not given).
FULL = dict(limits="1,3", targets="0.1,0.2,0.3,0.4,0.5", ratios="0.1,0.3,0.5,0.7,0.9",
            uniform_ratios="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", finetune_epochs=1, max_train=None,
            max_calib=None, max_test=None, measure_images=256, latency_repeats=30, out="bench/results")
QUICK = dict(limits="1,3", targets="0.2,0.4", ratios="0.25,0.5,0.75", uniform_ratios="0.2,0.4,0.6,0.8",
             finetune_epochs=1, max_train=500, max_calib=250, max_test=300, measure_images=128, latency_repeats=10,
             out="bench/results/quick")


def log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"[bench] {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from spikeprune.cli import add_data_args, add_device_arg, add_model_args
    from spikeprune.importance import CRITERIA

    p = argparse.ArgumentParser(
        prog="bench/policies.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run dense, uniform, PSViT, PrimeSVT, global L2 and random-at-PrimeSVT's-memory on one model and "
                    "dataset: memory, accuracy (calibration-chosen, test-measured, before and after the same "
                    "fine-tuning), SOPs, energy, interleaved latency, cost, and a memory/accuracy frontier.",
        epilog="defaults marked 'full / quick' differ with --quick. See bench/README.md.")
    add_model_args(p)
    add_data_args(p)
    add_device_arg(p)
    p.add_argument("--quick", action="store_true", help="the reduced protocol (about 10 minutes on 2 idle cores)")
    g = p.add_argument_group("protocol")
    g.add_argument("--policies", default=",".join(MAIN_POLICIES),
                   help="registered policy names, comma-separated; 'random' is the floor at PrimeSVT's memory "
                        "(needs primesvt). Default %(default)s")
    g.add_argument("--limits", default=None, help=f"accuracy limits in points (full / quick: {FULL['limits']})")
    g.add_argument("--targets", default=None,
                   help=f"frontier memory targets, fractions saved (full: {FULL['targets']} / quick: {QUICK['targets']})")
    g.add_argument("--frontier-limit", type=float, default=None, metavar="POINTS",
                   help="accuracy limit of the frontier runs (default: the largest of --limits; 100 = none)")
    g.add_argument("--no-frontier", action="store_true", help="skip the frontier")
    g.add_argument("--ratios", default=None, help=f"sensitivity grid (full: {FULL['ratios']} / quick: {QUICK['ratios']})")
    g.add_argument("--uniform-ratios", default=None,
                   help=f"uniform sweep grid (full: {FULL['uniform_ratios']} / quick: {QUICK['uniform_ratios']})")
    g.add_argument("--importance", default="l2", choices=CRITERIA, help="channel ranking of every policy (default l2)")
    g.add_argument("--round-to", type=int, default=1, metavar="N", help="round kept widths up to a multiple of N")
    g.add_argument("--calib-batches", type=int, default=4, metavar="N", help="calibration batches for taylor / firing")
    g.add_argument("--seed", type=int, default=0)
    f = p.add_argument_group("fine-tuning (the same budget for every policy)")
    f.add_argument("--finetune-epochs", type=int, default=None, metavar="N", help="epochs (full / quick: 1; 0 = none)")
    f.add_argument("--kd", action="store_true", help="distil from the dense model while fine-tuning")
    f.add_argument("--kd-weight", type=float, default=0.5)
    f.add_argument("--kd-temperature", type=float, default=4.0)
    f.add_argument("--finetune-lr", type=float, default=1e-4)
    f.add_argument("--finetune-batch-size", type=int, default=64)
    c = p.add_argument_group("image caps (reduced runs; stratified: the first images of each class in split order)")
    c.add_argument("--max-train", type=int, default=None, metavar="N", help="train images (full: all / quick: 500)")
    c.add_argument("--max-calib", type=int, default=None, metavar="N", help="calibration images (full: all / quick: 250)")
    c.add_argument("--max-test", type=int, default=None, metavar="N", help="test images (full: all / quick: 300)")
    m = p.add_argument_group("measurement and output")
    m.add_argument("--measure-images", type=int, default=None, metavar="N",
                   help="test images whose firing rates give SOPs and energy (full 256 / quick 128)")
    m.add_argument("--latency-repeats", type=int, default=None, metavar="N", help="interleaved repeats (full 30 / quick 10)")
    m.add_argument("--latency-batches", default="1,8", help="batch sizes timed (default %(default)s)")
    m.add_argument("--latency-warmup", type=int, default=3, metavar="N")
    m.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    m.add_argument("--out", default=None, help="results folder (full: bench/results / quick: bench/results/quick)")
    m.add_argument("--work", default=None, help="run folders (default runs/bench-policies/<settings hash>)")
    m.add_argument("--update-readme", action="store_true", help="write the results table into bench/README.md")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _floats(text: str, what: str) -> list[float]:
    try:
        out = [float(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise SpikepruneError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not out:
        raise SpikepruneError(f"{what} is empty")
    return out


def resolve_settings(args) -> dict:
    """The run's settings: explicit options, else the full or --quick defaults; checked."""
    from spikeprune.pipeline import get_policy, make_constraints
    from spikeprune.sensitivity import parse_ratios

    base = QUICK if args.quick else FULL
    pick = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    policies = [x for x in args.policies.replace(" ", "").split(",") if x]
    if not policies:
        raise SpikepruneError("--policies is empty")
    for name in policies:
        if name != RANDOM:
            get_policy(name)  # an unknown name fails here, with the list of known ones
    if RANDOM in policies and "primesvt" not in policies:
        raise SpikepruneError("'random' prunes at PrimeSVT's widths: add primesvt to --policies")
    if len(set(policies)) != len(policies):
        raise SpikepruneError(f"--policies names a policy twice: {args.policies}")
    policies = [x for x in policies if x != RANDOM] + ([RANDOM] if RANDOM in policies else [])  # after primesvt
    limits = sorted(set(_floats(pick["limits"], "--limits")))
    for L in limits:
        make_constraints(L)  # the pipeline's own checks
    targets = sorted(set(_floats(pick["targets"], "--targets")))
    for t in targets:
        make_constraints(limits[-1], target_saving=t)
    frontier_limit = args.frontier_limit if args.frontier_limit is not None else limits[-1]
    make_constraints(frontier_limit)
    for k in ("max_train", "max_calib", "max_test"):
        if pick[k] is not None and pick[k] < 1:
            raise SpikepruneError(f"--{k.replace('_', '-')} must be at least 1, got {pick[k]}")
    if pick["finetune_epochs"] < 0:
        raise SpikepruneError(f"--finetune-epochs must be 0 or more, got {pick['finetune_epochs']}")
    if args.kd and pick["finetune_epochs"] == 0:
        raise SpikepruneError("--kd distils during fine-tuning: give --finetune-epochs N (N >= 1) as well")
    if pick["latency_repeats"] < 1 or pick["measure_images"] < 1 or args.latency_warmup < 0:
        raise SpikepruneError("--latency-repeats and --measure-images must be at least 1, --latency-warmup >= 0")
    batches = [int(b) for b in _floats(args.latency_batches, "--latency-batches")]
    if min(batches) < 1:
        raise SpikepruneError(f"--latency-batches must be positive, got {args.latency_batches}")
    return {
        "model": args.preset if args.preset and args.model_spec in (None, "bundled") else args.model_spec,
        "checkpoint": args.checkpoint,
        "overrides": list(args.overrides), "data": args.data, "device": args.device, "quick": bool(args.quick),
        "policies": policies, "limits": limits, "targets": [] if args.no_frontier else targets,
        "frontier_limit": float(frontier_limit),
        "ratios": list(parse_ratios(pick["ratios"])), "uniform_ratios": list(parse_ratios(pick["uniform_ratios"],
                                                                                          "--uniform-ratios")),
        "importance": args.importance, "round_to": args.round_to, "calib_batches": args.calib_batches,
        "seed": args.seed, "batch_size": args.batch_size,
        "finetune": {"epochs": pick["finetune_epochs"], "kd": bool(args.kd),
                     "kd_weight": args.kd_weight if args.kd else None,
                     "kd_temperature": args.kd_temperature if args.kd else None,
                     "lr": args.finetune_lr, "batch_size": args.finetune_batch_size},
        "caps": {"train": pick["max_train"], "calib": pick["max_calib"], "test": pick["max_test"]},
        "measure_images": pick["measure_images"],
        "latency": {"batches": batches, "repeats": pick["latency_repeats"], "warmup": args.latency_warmup},
        "out": pick["out"],
    }


# ------------------------------------------------------------------------------------------------
# Image caps: every split is loaded through spikeprune.data.dataset_for_model, so wrapping it caps
# the pipeline, the policies, fine-tuning and measurement alike, without touching their code.
# ------------------------------------------------------------------------------------------------
def cap_dataset(ds, n: int):
    """The first n images of `ds`, taken round-robin over the classes in split order (stratified)."""
    labels = ds.labels.tolist()
    seen: dict[int, int] = {}
    rank = []
    for i, y in enumerate(labels):
        rank.append((seen.get(y, 0), y, i))
        seen[y] = seen.get(y, 0) + 1
    keep = sorted(i for _, _, i in sorted(rank)[:n])
    out = copy.copy(ds)
    if hasattr(ds, "index"):
        out.index = ds.index[keep]
    elif hasattr(ds, "paths"):
        out.paths = [ds.paths[i] for i in keep]
    else:
        raise SpikepruneError(f"cannot cap a {type(ds).__name__}: it has neither an image index nor a file list")
    out.labels = ds.labels[keep]
    return out


@contextlib.contextmanager
def capped_splits(caps: dict):
    import spikeprune.data as data_mod
    # Modules that bound the function at import time hold their own reference: import them first,
    # then replace it wherever it is bound.
    import spikeprune.importance, spikeprune.measure, spikeprune.pipeline  # noqa: E401, F401
    import spikeprune.sensitivity, spikeprune.train  # noqa: E401, F401

    original = data_mod.dataset_for_model
    if not any(caps.values()):
        yield
        return

    def capped(spec, model, split="test", augment=False):
        ds = original(spec, model, split, augment)
        n = caps.get(split)
        return cap_dataset(ds, n) if n and n < len(ds) else ds

    bound = [m for name, m in list(sys.modules.items())
             if name.startswith("spikeprune") and getattr(m, "dataset_for_model", None) is original]
    for m in bound:
        m.dataset_for_model = capped
    try:
        yield
    finally:
        for m in bound:
            m.dataset_for_model = original


# ------------------------------------------------------------------------------------------------
# One policy run, as `spikeprune prune` runs it
# ------------------------------------------------------------------------------------------------
def _context_class():
    from spikeprune.pipeline import PruneContext

    class BenchContext(PruneContext):
        """The pipeline's PruneContext, noting which shared results the policy read, so that their
        cost is charged to it. Nothing else differs."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.read: set[str] = set()

        def load_checkpoint(self, step: str):
            out = super().load_checkpoint(step)
            if out is not None and step in SHARED_STEPS:
                self.read.add(step)
            return out

        def sensitivity(self):
            self.read.add("sensitivity")
            return super().sensitivity()

    return BenchContext


class Bench:
    def __init__(self, S: dict, model, work: Path, progress: bool):
        self.S, self.model, self.work, self.progress = S, model, work, progress
        self.Context = _context_class()
        self.shared: dict = {}

    def context(self, run_dir: Path, constraints, importance: str | None = None, options: dict | None = None):
        S = self.S
        return self.Context(self.model, S["data"], run_dir, importance=importance or S["importance"],
                            round_to=S["round_to"], constraints=constraints, device=S["device"], seed=S["seed"],
                            batch_size=S["batch_size"], ratios=S["ratios"], uniform_ratios=S["uniform_ratios"],
                            calib_batches=S["calib_batches"], options=options, progress=self.progress)

    # shared work ------------------------------------------------------------------------------
    def compute_shared(self) -> dict:
        """Dense calibration top-1, uniform sweep, sensitivity: once, timed, in WORK/shared."""
        from spikeprune.pipeline import make_constraints
        from spikeprune.policies.uniform import uniform_sweep
        from spikeprune.serialization import write_json

        d = self.work / "shared"
        path = d / "shared.json"
        rec = json.loads(path.read_text()) if path.is_file() else {}
        ctx = self.context(d, make_constraints(self.S["limits"][-1]))
        pols = set(self.S["policies"])
        other = pols - set(MAIN_POLICIES)  # policies added later: assume they may read everything
        jobs = [("dense_calib", True, lambda: ctx.dense_calib_top1),
                ("uniform_sweep", bool(pols & {"uniform", "psvit"} or other), lambda: uniform_sweep(ctx)),
                ("sensitivity", bool(pols & {"psvit", "primesvt"} or other), ctx.sensitivity)]
        for name, needed, fn in jobs:
            if not needed or name in rec:
                continue
            log(f"shared: {name}")
            n0, t0 = ctx.images_evaluated, time.perf_counter()
            out = fn()
            entry = {"wall_s": time.perf_counter() - t0, "calib_images": ctx.images_evaluated - n0}
            if name == "dense_calib":
                entry["top1"] = out
            if name == "sensitivity":
                fc = out.forward_cost
                entry["forward_cost"] = {k: v for k, v in fc.items() if k != "unit"}
                # image-block passes -> whole-model forwards of one image, the unit of every other count
                entry["calib_images"] = fc["spent"] / fc["full_forward_units"] if fc["full_forward_units"] else 0.0
            rec[name] = entry
            write_json(path, rec)
        self.shared = rec
        return rec

    def _seed(self, run_dir: Path, same_importance: bool) -> None:
        """Copy the shared results into a fresh run folder (the policy's resume logic reads them)."""
        src = self.work / "shared"
        steps = ["dense_calib"] + (["uniform_sweep"] if same_importance else [])
        for s in steps:
            f = src / "steps" / f"{s}.json"
            if f.is_file() and not (run_dir / "steps" / f.name).exists():
                (run_dir / "steps").mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, run_dir / "steps" / f.name)
        csv = src / "sensitivity.csv"
        if same_importance and csv.is_file() and not (run_dir / csv.name).exists():
            shutil.copy2(csv, run_dir / csv.name)

    def shared_cost(self, used: set[str]) -> dict:
        items = [k for k in ("dense_calib", "uniform_sweep", "sensitivity") if k in used and k in self.shared]
        return {"used": items, "wall_s": sum(self.shared[k]["wall_s"] for k in items),
                "calib_images": sum(self.shared[k]["calib_images"] for k in items)}

    # one run ------------------------------------------------------------------------------------
    def run_policy(self, name: str, policy: str, constraints, main: bool, primesvt_model=None) -> dict:
        """Run `policy` (or the random floor at `primesvt_model`'s widths) in WORK/name and measure
        it; `main` runs also get fine-tuned and their SOPs / energy measured. Returns the record,
        with the final model under "_model" and the pruned one under "_pruned" (not saved in JSON)."""
        from spikeprune.measure import count_macs, count_params, memory_bytes
        from spikeprune.pipeline import get_policy
        from spikeprune.serialization import is_saved_model, load_model, save_model, write_json

        run_dir = self.work / name
        done = run_dir / "bench_result.json"
        if done.is_file() and is_saved_model(run_dir / "pruned"):
            rec = json.loads(done.read_text())
            final = run_dir / ("finetuned" if rec.get("finetuned") else "pruned")
            log(f"{name}: finished earlier, read back")
            return {**rec, "_model": load_model(final).eval(), "_pruned": load_model(run_dir / "pruned").eval()}

        importance, options, reg = self.S["importance"], {}, policy
        if policy == RANDOM:
            ratios = oneshot_ratios(self.model, primesvt_model)
            importance, reg = "random", "groups"
            options = {"ratio": [f"{g}={r!r}" for g, r in ratios.items()]}
        resumed = run_dir.is_dir() and any(run_dir.iterdir())
        self._seed(run_dir, importance == self.S["importance"])
        ctx = self.context(run_dir, constraints, importance, options)
        log(f"{name}: {LABELS.get(policy, policy)}, limit {constraints.max_acc_drop:g} points"
            + (f", target {constraints.target_saving:.0%} saved" if constraints.target_saving else ""))
        t0 = time.perf_counter()
        if policy == RANDOM and not options["ratio"]:
            from spikeprune.pipeline import PolicyResult  # PrimeSVT kept the dense model: so does the floor

            result = PolicyResult(ctx.prune({}), {}, {})
        else:
            result = get_policy(reg).fn(ctx)
        pruned = result.model.eval()
        calib = result.info.get("calib_top1")
        calib = float(calib) if calib is not None else ctx.calib_top1(pruned)
        search_s = time.perf_counter() - t0
        if policy == RANDOM and primesvt_model is not None and widths(pruned) != widths(primesvt_model):
            raise SpikepruneError(f"internal: the random floor has widths {widths(pruned)}, PrimeSVT's model "
                                  f"{widths(primesvt_model)}; oneshot_ratios no longer matches the engine's rounding")

        p = constraints.precision
        mem, dense_mem = memory_bytes(pruned), memory_bytes(self.model)
        budget = constraints.budget_bytes(dense_mem[p])
        shared = self.shared_cost(ctx.read)
        rec = {
            "name": name, "policy": policy, "limit": constraints.max_acc_drop, "target": constraints.target_saving,
            "ratios": {k: v for k, v in result.ratios.items()}, "widths": widths(pruned),
            "params": int(count_params(pruned)), "macs": int(count_macs(pruned)),
            "memory_bytes": {k: int(v) for k, v in mem.items()},
            "memory_saved": 1 - mem["fp32"] / dense_mem["fp32"], "memory_saved_int8": 1 - mem["int8"] / dense_mem["int8"],
            "calib_top1": calib, "calib_drop": ctx.acc_drop(calib),
            "acc_ok": ctx.within_limit(calib), "memory_ok": budget is None or mem[p] <= budget,
            "cost": {"own_wall_s": search_s, "own_calib_images": ctx.images_evaluated,
                     "own_calib_passes": ctx.evaluations, "shared": shared,
                     "search_wall_s": search_s + shared["wall_s"],
                     "calib_images": ctx.images_evaluated + shared["calib_images"]},
            "resumed": resumed,
        }
        rec["constraints_met"] = bool(rec["acc_ok"] and rec["memory_ok"])
        rec["test"] = self.test_top1(pruned)
        save_model(pruned, run_dir / "pruned")
        final, rec["finetuned"] = pruned, None
        if main and self.S["finetune"]["epochs"]:
            final, rec["finetuned"] = self.finetune(pruned, run_dir)
            rec["cost"]["finetune_wall_s"] = rec["finetuned"]["wall_s"]
            save_model(final, run_dir / "finetuned")
        if main:
            rec["activity"] = self.activity(final)
            rec["activity"]["of"] = "finetuned" if rec["finetuned"] else "pruned"
        write_json(run_dir / "policy_info.json", _jsonable({k: v for k, v in result.info.items()
                                                            if k not in ("plots", "report_sections")}))
        write_json(done, _jsonable(rec))
        log(f"{name}: memory saved {rec['memory_saved']:.2%}, calib drop {rec['calib_drop']:.2f} points, test top-1 "
            f"{rec['test']['top1']:.2%}" + (f" -> {rec['finetuned']['top1']:.2%} fine-tuned" if rec["finetuned"] else "")
            + f" ({rec['cost']['search_wall_s']:.1f} s search incl. shared)")
        return {**rec, "_model": final, "_pruned": pruned}

    # measurement ------------------------------------------------------------------------------
    def test_top1(self, model) -> dict:
        from spikeprune.data import dataset_for_model
        from spikeprune.train import evaluate

        test = dataset_for_model(self.S["data"], model, "test")
        r = evaluate(model, test, split="test", batch_size=self.S["batch_size"], device=self.S["device"],
                     progress=self.progress)
        return {"top1": r["top1"], "top5": r["top5"], "n": r["n"]}

    def activity(self, model) -> dict:
        """SOPs and energy from the firing rates on the first --measure-images test images."""
        from spikeprune.data import dataset_for_model
        from spikeprune.measure import measure

        test = dataset_for_model(self.S["data"], model, "test")
        t = measure(model, data=test, device=self.S["device"], n_images=min(self.S["measure_images"], len(test)),
                    batch_size=64, latency=False)["total"]
        return {"sops": t["sops"], "energy_mj": t["energy_mj"], "rate_images": t["rate_images"]}

    def finetune(self, pruned, run_dir: Path) -> tuple:
        from spikeprune.data import dataset_for_model
        from spikeprune.train import finetune

        F = self.S["finetune"]
        t0 = time.perf_counter()
        student = copy.deepcopy(pruned)
        model, history = finetune(student, self.S["data"], F["epochs"], teacher=self.model if F["kd"] else None,
                                  kd_weight=F["kd_weight"] or 0.5, kd_temperature=F["kd_temperature"] or 4.0,
                                  lr=F["lr"], batch_size=F["batch_size"], device=self.S["device"], seed=self.S["seed"],
                                  out_dir=run_dir / "finetune", resume=True, progress=self.progress)
        model.eval()
        wall = time.perf_counter() - t0
        n_train = len(dataset_for_model(self.S["data"], model, "train"))
        test = self.test_top1(model)
        return model, {**test, "calib_top1": history[-1].get("calib_top1") if history else None, "wall_s": wall,
                       "train_images": F["epochs"] * n_train}


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def widths(model) -> dict[str, int]:
    from spikeprune.groups import groups

    return {g.name: g.size for g in groups(model)}


def oneshot_ratios(dense, pruned) -> dict[str, float]:
    """Ratios that give, in one spikeprune.prune call on `dense`, the widths of `pruned` (PrimeSVT
    prunes step by step, so its own ratios are relative to intermediate models). qk / v ratios are
    per head dim: the heads group removes whole heads and qk / v thin every head that stays."""
    from spikeprune.groups import groups

    after = {g.name: g for g in groups(pruned)}
    out = {}
    for g in groups(dense):
        a = after[g.name]
        if g.heads > 1:  # per-head channel group: compare head dims
            before, now = g.size // g.heads, a.size // a.heads
        else:
            before, now = g.size, a.size
        if now < before:
            out[g.name] = (before - now) / before  # kept = before - floor(r * before + 0.5) = now
    return out


def interleaved_latency(models: dict, shape: tuple, batches: list[int], repeats: int, warmup: int,
                        device: str, progress: bool) -> dict:
    """{batch: {name: {"median_ms", "min_ms", "times_ms"}}}: for each repeat, one timed forward of
    every model, the order rotated by one each repeat so no model always follows the same one."""
    dev = torch.device(device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    names = list(models)
    out = {}
    for b in batches:
        x = torch.rand(b, *shape, generator=torch.Generator().manual_seed(0)).to(dev)
        times = {n: [] for n in names}
        with torch.no_grad():
            for n in names:
                models[n].to(dev).eval()
                for _ in range(warmup):
                    models[n](x)
            it = range(repeats)
            if progress:
                from tqdm import tqdm

                it = tqdm(it, desc=f"latency batch {b}", leave=False)
            for r in it:
                for n in names[r % len(names):] + names[:r % len(names)]:
                    sync()
                    t0 = time.perf_counter()
                    models[n](x)
                    sync()
                    times[n].append(1e3 * (time.perf_counter() - t0))
        out[b] = {n: {"median_ms": statistics.median(t), "min_ms": min(t), "times_ms": [round(v, 4) for v in t]}
                  for n, t in times.items()}
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not callable(v) and not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj if not callable(v)]
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict:
    m = {"platform": platform.platform(), "processor": _cpu_name(),
         "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
         "torch_threads": torch.get_num_threads(), "device": device}
    if hasattr(os, "getloadavg"):
        m["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device == "cuda" and torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name(0)
    return m


def describe(model, spec: str) -> str:
    c = model.cfg
    return (f"{spec} (Spikformer D={c.embed_dim}, depth {len(c.blocks)}, heads {c.blocks[0]['heads']}, T={c.T}, "
            f"{c.img_size}x{c.img_size})")


def settings_hash(S: dict, model_hash: str) -> str:
    keep = {k: v for k, v in S.items() if k not in ("out", "latency", "quick")}
    return hashlib.sha256(json.dumps({**keep, "model_hash": model_hash}, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------
# Results: JSON, markdown, plot
# ------------------------------------------------------------------------------------------------
def _pct(x, d=2):
    return "-" if x is None else f"{100 * x:.{d}f}%"


def _si(x):
    if x is None:
        return "-"
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.2f}{unit}"
    return f"{x:.0f}"


def _bytes(n):
    return "-" if n is None else (f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB")


def main_table(doc: dict, limit: float) -> str:
    from spikeprune.report import markdown_table

    batches = doc["settings"]["latency"]["batches"]
    d = doc["dense"]
    rows = [{"policy": "dense", "saved": 0.0, "fp32": d["memory_bytes"]["fp32"], "int8": d["memory_bytes"]["int8"],
             "params": d["params"], "macs": d["macs"], "sops": d["sops"], "energy": d["energy_mj"], "drop": 0.0,
             "test": d["test"]["top1"], "ft": None, "met": "", "search": None, "images": None,
             **{f"b{b}": 1.0 for b in batches}}]
    for r in doc["results"]:
        if r["limit"] != limit:
            continue
        rows.append({"policy": LABELS.get(r["policy"], r["policy"]), "saved": r["memory_saved"],
                     "fp32": r["memory_bytes"]["fp32"], "int8": r["memory_bytes"]["int8"], "params": r["params"],
                     "macs": r["macs"], "sops": r["activity"]["sops"], "energy": r["activity"]["energy_mj"],
                     "drop": r["calib_drop"], "test": r["test"]["top1"],
                     "ft": r["finetuned"]["top1"] if r["finetuned"] else None,
                     "met": "yes" if r["constraints_met"] else "no",
                     "search": r["cost"]["search_wall_s"], "images": r["cost"]["calib_images"],
                     **{f"b{b}": r["speedup"].get(str(b)) for b in batches}})
    cols = [("policy", "policy", str), ("memory saved", "saved", _pct), ("fp32", "fp32", _bytes),
            ("int8", "int8", _bytes), ("params", "params", _si), ("MACs", "macs", _si), ("SOPs", "sops", _si),
            ("energy mJ", "energy", lambda x: "-" if x is None else f"{x:.4g}"),
            ("calib drop", "drop", lambda x: f"{x:.2f}"), ("test top-1", "test", _pct),
            ("fine-tuned", "ft", _pct)]
    cols += [(f"speedup b{b}", f"b{b}", lambda x: "-" if x is None else f"{x:.2f}x") for b in batches]
    cols += [("search s", "search", lambda x: "-" if x is None else f"{x:.1f}"),
             ("calib fwd", "images", lambda x: "-" if x is None else f"{x:,.0f}"), ("within limit", "met", str)]
    return markdown_table(rows, cols)


def frontier_table(doc: dict) -> str:
    pols = doc["settings"]["policies"]
    lines = ["| target | " + " | ".join(LABELS.get(p, p) for p in pols) + " |", "|---|" + "---|" * len(pols)]
    for t in doc["settings"]["targets"]:
        cells = []
        for p in pols:
            pt = next((x for x in doc["frontier"] if x["policy"] == p and abs(x["target"] - t) < 1e-12), None)
            if pt is None:
                cells.append("-")
            elif pt.get("error"):
                cells.append("error")
            else:
                mark = "" if pt["constraints_met"] else " (not met)"
                cells.append(f"{_pct(pt['test_top1'])} at {_pct(pt['memory_saved'], 1)}{mark}")
        lines.append(f"| {_pct(t, 0)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(doc: dict, plot_name: str | None, heading: str = "#") -> str:
    S, d, mach = doc["settings"], doc["dense"], doc["machine"]
    h2 = heading + "#"
    F = S["finetune"]
    ft = (f"{F['epochs']} epoch(s), lr {F['lr']:g}, batch {F['batch_size']}"
          + (f", KD from the dense model (weight {F['kd_weight']:g}, T {F['kd_temperature']:g})" if F["kd"] else ", no KD")
          if F["epochs"] else "none")
    sh = doc["shared"]
    lines = [
        f"{heading} Policy benchmark: {doc['model']} on {S['data']}" + (" (quick)" if S["quick"] else ""), "",
        f"- Command: `{doc['command']}`",
        f"- Machine: {mach['platform']}, {mach['processor']}, {mach['cpu_count']} CPUs, torch {mach['torch']} "
        f"({mach['torch_threads']} threads), device {mach['device']}" + (f" ({mach['gpu']})" if mach.get("gpu") else "")
        + (f"; load average {mach['load_average_at_start']} at start, {mach.get('load_average_at_end')} at end"
           if mach.get("load_average_at_start") else ""),
        f"- Date: {doc['date']}; wall time {doc['wall_time_s'] / 60:.1f} min",
        f"- Images: train {doc['split_sizes']['train']:,} / calib {doc['split_sizes']['calib']:,} / test "
        f"{doc['split_sizes']['test']:,}; SOPs and energy from {S['measure_images']} test images",
        f"- Dense: test top-1 {_pct(d['test']['top1'])}, calibration top-1 {_pct(d['calib_top1'])}, "
        f"{_bytes(d['memory_bytes']['fp32'])} fp32",
        f"- Fine-tuning (the same for every policy): {ft}. Importance {S['importance']}, round_to {S['round_to']}, "
        f"sensitivity ratios {S['ratios']}, uniform sweep {S['uniform_ratios']}.",
        f"- Latency: {doc['machine']['device']}, batches {S['latency']['batches']}, {S['latency']['repeats']} "
        "interleaved repeats, median; speedup = dense median / model median.", ""]
    for L in S["limits"]:
        lines += [f"{h2} Accuracy limit {L:g} points (calibration split), no memory target", "", main_table(doc, L), ""]
    lines += ["Memory saved is at fp32 (int8 savings are in policies.json); calib drop is in top-1 points on the "
              "calibration split, where every decision is made; test top-1 is on the test split, before and after "
              "fine-tuning; SOPs and energy are of the final model (fine-tuned when fine-tuning ran). "
              "'search s' and 'calib fwd' (calibration images through the whole model) include the shared work each "
              "policy read; the random floor is charged only its own work, not PrimeSVT's.", ""]
    if doc["frontier"]:
        lines += [f"{h2} Frontier: test top-1 at each memory target (limit {S['frontier_limit']:g} points, "
                  "no fine-tuning)", "",
                  "Each cell: test top-1 of the model the policy chose on the calibration split, at the memory it "
                  "saved; 'not met' when it could not reach the target within the limit.", "", frontier_table(doc), ""]
        if plot_name:
            lines += [f"![accuracy against memory saved]({plot_name})", ""]
    lines += [f"{h2} Shared work (computed once, charged to every policy that read it)", ""]
    for k, who in (("dense_calib", "every policy"), ("uniform_sweep", "uniform, PSViT"),
                   ("sensitivity", "PSViT, PrimeSVT")):
        if k in sh:
            extra = ""
            if k == "sensitivity":
                fc = sh[k]["forward_cost"]
                extra = (f"; {fc['spent']:,.0f} image-block passes, {fc['ratio']:.2f}x fewer than recomputing "
                         f"every candidate")
            lines.append(f"- {k.replace('_', ' ')}: {sh[k]['wall_s']:.1f} s, {sh[k]['calib_images']:,.0f} calibration "
                         f"image forwards{extra} (charged to {who})")
    if doc["notes"]:
        lines += ["", f"{h2} Notes", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def plot_frontier(path: Path, doc: dict) -> None:
    from spikeprune.report import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    dense = 100 * doc["dense"]["test"]["top1"]
    ax.plot([0], [dense], "k*", ms=13, label="dense", zorder=2)
    colors = plt.get_cmap("tab10")
    for i, p in enumerate(doc["settings"]["policies"]):
        pts = sorted((x for x in doc["frontier"] if x["policy"] == p and not x.get("error")),
                     key=lambda x: (x["memory_saved"], x["target"]))  # a curve along the x axis
        if not pts:
            continue
        xs, ys = [100 * x["memory_saved"] for x in pts], [100 * x["test_top1"] for x in pts]
        ax.plot(xs, ys, "-", color=colors(i), lw=1.3, label=LABELS.get(p, p))
        for x, y, pt in zip(xs, ys, pts):
            ax.plot([x], [y], "o", color=colors(i), ms=6, mfc=colors(i) if pt["constraints_met"] else "white", zorder=3)
    for t in doc["settings"]["targets"]:
        ax.axvline(100 * t, color="grey", lw=0.6, ls=":")
    L = doc["settings"]["frontier_limit"]
    if L < 100:
        ax.axhline(dense - L, color="tab:red", lw=1, ls="--", label=f"dense - {L:g} pts (the limit, applied on calib)")
    ax.set_xlabel("memory saved (%, fp32)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{doc['model']} on {doc['settings']['data']}: accuracy against memory saved\n"
                 "(targets dotted; hollow = target not met within the limit; no fine-tuning)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)


def update_readme(readme: Path, doc: dict, out: Path) -> None:
    from spikeprune.serialization import atomic_path

    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SpikepruneError(f"{readme} has no {README_START} ... {README_END} markers to write the table between")
    plot = os.path.relpath(out / "frontier.png", readme.parent) if doc["frontier"] else None
    body = write_markdown(doc, plot, heading="###")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    with atomic_path(readme) as tmp:
        tmp.write_text(f"{head}{README_START}\n{body}{README_END}{tail}")


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def run(args, argv: list[str]) -> dict:
    import spikeprune.data as data_mod
    from spikeprune.cli import resolve_model
    from spikeprune.measure import count_macs, count_params, memory_bytes
    from spikeprune.pipeline import make_constraints
    from spikeprune.sensitivity import model_hash
    from spikeprune.serialization import write_json

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    S = resolve_settings(args)
    if S["device"] == "cuda" and not torch.cuda.is_available():
        raise SpikepruneError("--device cuda was asked for but no CUDA GPU is available here; use --device cpu")
    progress = not args.quiet
    mach = machine(S["device"])
    model = resolve_model(args).eval()
    mh = model_hash(model)
    work = Path(args.work) if args.work else ROOT / "runs" / "bench-policies" / settings_hash(S, mh)
    out = Path(S["out"]) if os.path.isabs(S["out"]) else ROOT / S["out"]
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "bench.json", {"format": FORMAT, "settings": S, "model_hash": mh})
    log(f"work folder {work}; results to {out}")
    bench = Bench(S, model, work, progress)
    notes = []

    with capped_splits(S["caps"]):
        sizes = {s: len(data_mod.dataset_for_model(S["data"], model, s)) for s in ("train", "calib", "test")}
        bench.compute_shared()

        # 1. Dense figures (test split).
        d_mem = memory_bytes(model)
        dense = {"test": bench.test_top1(model), "calib_top1": bench.shared["dense_calib"]["top1"],
                 "params": int(count_params(model)), "macs": int(count_macs(model)),
                 "memory_bytes": {k: int(v) for k, v in d_mem.items()}, **bench.activity(model)}

        # 2. Each policy at each limit.
        results, models = [], {"dense": model}
        for L in S["limits"]:
            cons = make_constraints(L)
            prime = None
            for p in S["policies"]:
                name = f"{p}-L{L:g}"
                rec = bench.run_policy(name, p, cons, main=True, primesvt_model=prime)
                if p == "primesvt":
                    prime = rec["_pruned"]
                models[name] = rec.pop("_model")
                rec.pop("_pruned")
                results.append(rec)

        # 3. Frontier (no fine-tuning).
        frontier = []
        for t in S["targets"]:
            cons = make_constraints(S["frontier_limit"], target_saving=t)
            prime = None
            for p in S["policies"]:
                name = f"frontier-{t:g}/{p}"
                if p == RANDOM and prime is None:
                    frontier.append({"policy": p, "target": t, "error": "PrimeSVT failed at this target"})
                    continue
                try:
                    rec = bench.run_policy(name, p, cons, main=False, primesvt_model=prime)
                except SpikepruneError as e:  # e.g. a target below the smallest model: record it, go on
                    log(f"{name}: {e}")
                    frontier.append({"policy": p, "target": t, "error": str(e)})
                    continue
                if p == "primesvt":
                    prime = rec["_pruned"]
                rec.pop("_model"), rec.pop("_pruned")
                frontier.append({"policy": p, "target": t, "memory_saved": rec["memory_saved"],
                                 "memory_bytes": rec["memory_bytes"], "calib_top1": rec["calib_top1"],
                                 "calib_drop": rec["calib_drop"], "test_top1": rec["test"]["top1"],
                                 "constraints_met": rec["constraints_met"], "memory_ok": rec["memory_ok"],
                                 "cost": rec["cost"], "ratios": rec["ratios"]})

    # 4. Latency: every model in one interleaved timer.
    cfg = model.cfg
    lat = interleaved_latency(models, (cfg.in_channels, cfg.img_size, cfg.img_size), S["latency"]["batches"],
                              S["latency"]["repeats"], S["latency"]["warmup"], S["device"], progress)
    dense["latency_ms"] = {str(b): lat[b]["dense"]["median_ms"] for b in lat}
    for r in results:
        r["latency_ms"] = {str(b): lat[b][r["name"]]["median_ms"] for b in lat}
        r["speedup"] = {str(b): lat[b]["dense"]["median_ms"] / lat[b][r["name"]]["median_ms"] for b in lat}

    if sizes["calib"] < 1000:
        from spikeprune.sensitivity import calib_resolution

        res = calib_resolution(sizes["calib"], dense["calib_top1"])
        notes.append(f"the calibration split has {sizes['calib']} images: one image is {res['image_points']:.2f} points "
                     f"and the standard error of a top-1 estimate {res['se_points']:.2f} points, so decisions at a "
                     "1-point limit are noisy")
    notes.append("random @ PrimeSVT memory: the per-group widths of PrimeSVT's result at the same limit / target, "
                 "channels chosen at random (importance 'random', seed "
                 f"{S['seed']}); its calib drop may break the limit: it is a floor, not a policy")
    notes.append("global L2: Torch-Pruning-style global ranking (spikeprune/policies/global_l2.py): every channel "
                 "scored by the group L2 norm, divided by its group's mean, ranked together")
    if mach.get("load_average_at_start") and mach["load_average_at_start"][0] > (os.cpu_count() or 1):
        notes.append(f"the machine was shared (load average {mach['load_average_at_start'][0]:.1f} on "
                     f"{os.cpu_count()} CPUs at the start): wall times are inflated; speedups come from the "
                     "interleaved timer and are less affected")
    if hasattr(os, "getloadavg"):
        mach["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    doc = {
        "format": FORMAT, "version": 1,
        "command": "python bench/policies.py" + ("" if not argv else " " + shlex.join(argv)),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": mach, "model": describe(model, S["model"]), "model_hash": mh, "settings": S, "split_sizes": sizes,
        "work": str(work), "dense": dense, "shared": bench.shared, "results": results, "frontier": frontier,
        "latency": {str(b): {n: v for n, v in lat[b].items()} for b in lat},
        "wall_time_s": time.perf_counter() - t_start, "notes": notes,
    }
    doc = _jsonable(doc)
    out.mkdir(parents=True, exist_ok=True)
    plot = None
    if frontier:
        plot_frontier(out / "frontier.png", doc)
        plot = "frontier.png"
    from spikeprune.serialization import atomic_path

    write_json(out / "policies.json", doc)
    with atomic_path(out / "policies.md") as tmp:
        tmp.write_text(write_markdown(doc, plot))
    if args.update_readme:
        update_readme(ROOT / "bench" / "README.md", doc, out)
    log(f"wrote {out / 'policies.json'}, {out / 'policies.md'}" + (f", {out / 'frontier.png'}" if plot else "")
        + f" in {doc['wall_time_s'] / 60:.1f} min")
    return doc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        run(args, argv)
    except SpikepruneError as e:
        print(f"bench/policies.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
