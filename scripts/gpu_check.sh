#!/usr/bin/env bash
# The GPU path of the recipe, proven in one go on a lent H100/H200 (the `device` tool's
# `run`; ~10 minutes). Not part of `make test`: CI has no GPU.
#
#   1. the CUDA test: flex attention's compiled kernel, forward and backward, equals the
#      masked SDPA reference (tests/unit/test_attention.py, skipped without a GPU);
#   2. `scripts.bench_train` at d12 and d20: bf16 + compile, windows L and SSSL, fp8 off and on
#      (tokens/s, MFU, peak memory; the rows go to docs/benchmarks.md with --record);
#   3. a short d12 pretrain on the embedded corpus through compile (and fp8 when torchao is
#      there): the loss falls, a checkpoint is written, a second run resumes from it.
#
# Prepare here, once (the device has no internet): a BASE_DIR with the tiny preset's
# tokenizer and embedded shards in .gpu/base (`NANOCHAT_BASE_DIR=$PWD/.gpu/base make tokenizer
# PRESET=tiny`), and torchao as a wheel in .gpu/wheels for fp8; name .gpu in `carry`.
# Usage there: bash scripts/gpu_check.sh "$OUT"
set -uo pipefail
OUT=${1:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
exec > >(tee "$OUT/gpu_check.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

echo "== 1. CUDA tests"
$PY -m pytest -q -p no:cacheprovider tests/unit/test_attention.py

echo "== 2. bench (bf16 + compile)"
for depth in 12 20; do
  for windows in L SSSL; do
    $PY -m scripts.bench_train --depth=$depth --device-batch=16 --window-pattern=$windows --record
  done
  $PY -m scripts.bench_train --depth=$depth --device-batch=16 --fp8 --record || echo "fp8: not run (torchao missing?)"
done
$PY -m scripts.bench_train --depth=24 --device-batch=16 --record
$PY -m scripts.bench_train --depth=24 --device-batch=16 --fp8 --record || echo "fp8: not run"

echo "== 3. a short d12 pretrain, then a resume"
export NANOCHAT_BASE_DIR=$PWD/.gpu/base
common=(--depth=12 --dataset=embedded --seq-len=2048 --device-batch=16 --total-batch=131072
        --eval-every=20 --eval-batches=2 --core-every=0 --sample-every=0 --save-every=20
        --window-pattern=SSSL --tag=gpu-check)
$PY -m scripts.base_train "${common[@]}" --num-steps=40 --stop-at=20 --resume=never
$PY -m scripts.base_train "${common[@]}" --num-steps=40 --resume=auto
ls -la "$NANOCHAT_BASE_DIR/base_checkpoints/gpu-check" | tee "$OUT/checkpoints.txt"
cp "$NANOCHAT_BASE_DIR/logs/pretrain-gpu-check.jsonl" "$OUT/" 2>/dev/null
cp docs/benchmarks.md "$OUT/benchmarks.md"
