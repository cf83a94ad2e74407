#!/usr/bin/env bash
# The CUDA / NCCL paths end to end on one GPU, and the GPU latency benchmark, in one short run
# (about 6 minutes on one H200). Writes its logs and JSON into $OUT (default /tmp/gpu-check); the
# results kept in bench/results/gpu-h200/ come from it.
#
#   OUT=/tmp/gpu-check bash bench/gpu_check.sh
#
# On a machine whose Python lacks mlxtend / kornia, put their wheels in .whl/ first: they are
# installed into /tmp/site for this run only.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
source bench/gpu_env.sh  # the carried wheels, PYTHONPATH
STEPS=${STEPS:-evaluate prune finetune sensitivity latency}  # a subset reruns only those
step() {  # step NAME SECONDS COMMAND...: one step, its log in $OUT/NAME.log, its exit code noted
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" ${name%%-*} "*) ;; *) return 0 ;; esac
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
  tail -n 15 "$OUT/$name.log"
}
nvidia-smi -L >"$OUT/machine.txt" 2>&1
python3 -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'nccl', torch.cuda.nccl.version(), 'python', platform.python_version())" >>"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# 1. The same model evaluated on the CPU and on the GPU: the same test top-1 (up to float sums).
step evaluate-cpu 120 python3 -m spikeprune evaluate bundled --data mnist5k --device cpu --json
step evaluate-cuda 120 python3 -m spikeprune evaluate bundled --data mnist5k --device cuda --json
step evaluate-cuda0 120 python3 -m spikeprune evaluate bundled --data mnist5k --device cuda:0 --json
# 2. A whole PrimeSVT run on the GPU: sensitivity, pruning, KD fine-tuning with AMP, measure, report.
rm -rf /tmp/run-cuda
step prune-cuda 240 python3 -m spikeprune prune bundled --data mnist5k --policy primesvt --max-acc-drop 3 --finetune-epochs 1 --kd \
  --device cuda --quiet -o /tmp/run-cuda
cp /tmp/run-cuda/summary.json "$OUT/prune-cuda-summary.json" 2>/dev/null
# 3. torchrun over NCCL (one process: NCCL refuses two ranks on one GPU): DDP fine-tuning with
#    SyncBatchNorm, the sharded evaluation, rank-0 writes, and a clean exit.
rm -rf /tmp/ft-nccl
step finetune-nccl 180 python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m spikeprune finetune \
  /tmp/run-cuda/model --teacher bundled --data mnist5k --epochs 1 --sync-bn --device cuda --quiet --json -o /tmp/ft-nccl
step sensitivity-nccl 120 python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m spikeprune sensitivity \
  bundled --data mnist5k --device cuda -o /tmp/sens-nccl.csv
cp /tmp/sens-nccl.csv "$OUT/sensitivity-nccl.csv" 2>/dev/null
# 4. Latency on the GPU: dense vs pruned, eager and CUDA graph, batch 1 / 8 / 64.
step latency 300 python3 bench/export_latency.py --device cuda --repeats 10 --tag gpu-h200
cp bench/results/export-latency-gpu-h200.json bench/results/export-latency-gpu-h200.md "$OUT/" 2>/dev/null
cat "$OUT/steps.txt"
