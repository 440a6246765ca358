#!/usr/bin/env bash
# One GPU session's measurements: environment, a tiny smoke run, then the full-size benchmarks.
# Usage (on a machine with the project's wheels in .whl/ when the image lacks them):
#   bash benchmarks/gpu_run.sh OUTDIR [steps|edit|all]
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/env.txt"
python3 -c "import jax, flax, torch, diffusers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__, jax.devices())" | tee -a "$out/env.txt"
if [ "$what" = steps ] || [ "$what" = all ]; then
  timeout 120 python3 benchmarks/bench_steps.py --model tiny --res 128 --dtype bfloat16 --batch 1 --iters 3 --loop-iters 4 --no-torch 2>&1 | tail -6
  timeout 420 python3 benchmarks/bench_steps.py --model sd15 --res 512 --dtype bfloat16 --batch 1 8 --iters 5 \
    --loop-iters 10 --out "$out/gpu_steps.json" 2>&1 | grep -v -i warn | tee "$out/gpu_steps.log" | tail -25
fi
if [ "$what" = edit ] || [ "$what" = all ]; then
  timeout 540 python3 benchmarks/bench_edit.py --model sd15 --res 512 --dtype bfloat16 --batch ${BATCHES:-1 8} \
    ${REMAT:+--remat} --out "$out/gpu_edit.json" 2>&1 | grep -v -i warn | tee "$out/gpu_edit.log" | tail -25
fi
