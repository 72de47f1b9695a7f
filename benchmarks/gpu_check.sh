#!/usr/bin/env bash
# GPU tests, the generation benchmark on the H200, and a CPU test subset under
# the machine's own torch/transformers (2.11 / 5.17), so the code is checked on both versions.
#   run on a CUDA machine from the repo root; results land in $OUT (default: ./out)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider -rA tests/test_gpu.py 2>&1 | grep -v DEBUG | tee "$OUT/gpu_tests.log" \
    | grep -E "quantisation error|passed|failed|FAILED"
# every quantisation preset x {plain, MTP k=1} in bf16 against the same preset on the CPU in float32
timeout 300 python3 benchmarks/quant_sweep.py --device cuda --dtype bfloat16 --out "$OUT/quant_sweep_cuda_bf16.md" 2>"$OUT/quant_sweep.err"
timeout 200 python3 -m graphopt.cli bench --device cuda --dtype bfloat16 --prompts 8 --new-tokens 64 --k 0 1 2 \
    --out "$OUT/bench_h200.md" 2>&1 | grep -v Warning | tail -12
timeout 130 python3 -m pytest -q -x -p no:cacheprovider tests/models/test_deepseek.py tests/test_api.py \
    tests/passes/test_manager.py 2>&1 | tail -6 | tee "$OUT/cpu_subset.log"
