"""`make demo`: the main job on the bundled defaults.

Takes the shipped Spikformer (trained on mnist5k), runs PrimeSVT under a 3-point accuracy limit
with one epoch of distillation fine-tuning, and prints the dense / pruned / fine-tuned table.
Everything lands in runs/demo/ (report.md is the page to read). Running it again resumes the
finished steps; `python -m spikeprune.demo --fresh` starts over.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from .bundled import bundled_model
from .errors import SpikepruneError
from .report import format_summary_table
from .run import prune_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spikeprune.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--policy", default="primesvt", help="pruning policy (default primesvt)")
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tuning epochs (default 1)")
    p.add_argument("--fresh", action="store_true", help="discard an earlier demo run in the folder")
    args = p.parse_args(argv)

    t0 = time.time()
    out = Path(args.output)
    if args.fresh and (out / "run.json").is_file():  # only ever a run folder: --fresh must not delete other files
        shutil.rmtree(out)
    model = bundled_model()
    print(f"spikeprune demo: {args.policy} on the bundled Spikformer-2-128 (mnist5k), accuracy limit 3 points, "
          f"{args.finetune_epochs} fine-tuning epoch(s) with distillation -> {args.output}/", flush=True)
    try:
        summary = prune_run(model, "mnist5k", args.output, policy=args.policy, max_acc_drop=3.0,
                            finetune_epochs=args.finetune_epochs, kd=args.finetune_epochs > 0,
                            force=args.fresh, model_spec="bundled")  # force: replace another run's folder
    except SpikepruneError as e:
        hint = " (for the demo: python -m spikeprune.demo --fresh)" if "--force" in str(e) else ""
        print(f"spikeprune: error: {e}{hint}", file=sys.stderr)
        return 2
    print()
    print(format_summary_table(summary))
    print(f"\nreport: {args.output}/report.md   model: {args.output}/model/   ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
