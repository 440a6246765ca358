#!/usr/bin/env bash
# One accelerator session's measurements, each step one call under 10 minutes that writes its
# figures as it goes. The default steps need only jax[cuda] (or jax[tpu]) and jaxdrag's runtime
# dependencies — no torch, diffusers or transformers: full-size SD-1.5 weights come from the
# project's own random initialiser. The PyTorch side-by-side is the separate, optional step
# "torch" (needs torch + diffusers + transformers).
#
#   bash benchmarks/gpu_run.sh OUTDIR [env|smoke|plan|edit1|edit8|dragbench|torch|all]   (all = the torch-free steps)
#
# Wheels: when the machine lacks the packages, put them in .whl/ (installed to /tmp/site, no index).
# REMAT=off|blocks|dots picks the remat policy of the batch-8 edit (default dots).
# dragbench: DragBench (DRAGBENCH=folder, default ../shared/data/DragBench; DB_LIMIT samples, default all
# 205) with faithful DragText, compilation included (issue 25's goal: under 12 minutes on one H100), in
# masked-canvas buckets (DB_BUCKETS=auto, default; exact: one group per shape; exact,auto: both side by side).
set -uo pipefail
out=${1:?output folder}; what=${2:-all}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
step() { [ "$what" = "$1" ] || { [ "$what" = all ] && [ "$1" != torch ]; }; }
run() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  echo "== $name: $*" | tee -a "$out/commands.txt"
  timeout "$secs" "$@" 2>&1 | grep -v -i warn | tee "$out/$name.log" | tail -20
}
if step env; then
  (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true) | tee "$out/env.txt"
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$out/env.txt"
fi
if step smoke; then
  run smoke 300 python3 benchmarks/bench_edit.py --model tiny --res 128 --batch 1 --lora-steps 4 --drag-iters 4 \
    --no-torch --once --out "$out/smoke.json"
fi
if step plan; then
  run plan 570 python3 benchmarks/bench_edit.py --model sd15 --res 512 --dtype bfloat16 --batch --plan \
    --remat "${REMAT:-dots}" --no-torch --out "$out/gpu_plan.json"
fi
if step edit1; then
  run edit1 570 python3 benchmarks/bench_edit.py --model sd15 --res 512 --dtype bfloat16 --batch 1 --once \
    --no-torch --out "$out/gpu_edit_b1.json"
fi
if step edit8; then
  run edit8 570 python3 benchmarks/bench_edit.py --model sd15 --res 512 --dtype bfloat16 --batch 8 --once \
    --remat "${REMAT:-dots}" --no-torch --out "$out/gpu_edit_b8.json"
fi
if step dragbench; then
  db=${DRAGBENCH:-../shared/data/DragBench}
  if [ -d "$db" ]; then
    run dragbench 590 python3 benchmarks/dragbench_run.py "$db" --model sd15 --dtype bfloat16 --batch-size 8 \
      --limit "${DB_LIMIT:-205}" --buckets "${DB_BUCKETS:-auto}" --out "$out/gpu_dragbench.json"
  else
    echo "== dragbench: $db not present, skipped" | tee -a "$out/commands.txt"
  fi
fi
if step torch; then  # optional: the PyTorch reference of the same work, same process and weights
  run torch_steps 570 python3 benchmarks/bench_steps.py --model sd15 --res 512 --dtype bfloat16 --batch 1 8 \
    --iters 5 --loop-iters 10 --out "$out/gpu_steps.json"
  run torch_edit 570 python3 benchmarks/bench_edit.py --model sd15 --res 512 --dtype bfloat16 --batch 1 --once \
    --out "$out/gpu_edit_torch.json"
fi
