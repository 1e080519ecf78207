#!/usr/bin/env bash
# The GPU checks, in one script for a rented/lent CUDA machine (run from the repo root; uses the machine's
# own torch + transformers, no install: PYTHONPATH=src). Writes its logs to $OUT (default /tmp/ember-gpu):
#   1. benchmarks/bench_model.py on the GPU: ember vs transformers' Llama, fp32 and bf16, with peak memory
#   2. `ember pipeline --preset=smoke` end to end on the GPU (every stage's CUDA path), timed
#   3. `ember pipeline` (the quickstart recipe) on the GPU, timed, cut off after $QUICKSTART_S seconds
#   4. the CUDA tests (tests/model/test_gpu.py) and a compiled, activation-checkpointed pretrain on the smoke data
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-/tmp/ember-gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)" \
    | tee -a "$out/gpu.txt"
python3 benchmarks/bench_model.py --device=cuda --configs="${CONFIGS:-small,medium,gpu}" --steps=10 \
    >"$out/bench_model_gpu.txt" 2>&1
tail -8 "$out/bench_model_gpu.txt"
for recipe in smoke quickstart; do
    start=$(date +%s)
    timeout "${QUICKSTART_S:-240}" python3 -m ember pipeline --preset=$recipe --run=/tmp/ember-gpu-$recipe \
        >"$out/pipeline_$recipe.txt" 2>&1
    echo "pipeline $recipe: exit $? after $(( $(date +%s) - start )) s"
    grep -iE "error|traceback" "$out/pipeline_$recipe.txt" | head -5
done
python3 -m pytest -q -p no:cacheprovider tests/model/test_gpu.py 2>&1 | tail -3
timeout 300 python3 -m ember pretrain --preset=smoke --run=/tmp/ember-gpu-smoke --compile=true \
    --activation_checkpointing=true >"$out/pretrain_compiled.txt" 2>&1
echo "compiled pretrain: exit $?"; grep -E "^\[pretrain\]|step|Error" "$out/pretrain_compiled.txt" | tail -4
