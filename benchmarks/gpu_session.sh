#!/usr/bin/env bash
# The GPU-only measurements, one step per call (a device call may run 10 minutes; the session has 30 in all).
#
#   bash benchmarks/gpu_session.sh env                       # versions, GPU name
#   bash benchmarks/gpu_session.sh test                      # kernel tests on the real GPU (compiled, not interpreted)
#   bash benchmarks/gpu_session.sh kernels                   # bench_dequant_matmul: fused vs bf16 vs deq+mm
#   bash benchmarks/gpu_session.sh bench SHAPE VARIANTS TOKENS [LENGTHS] [compile|eager]
#        e.g. bench qwen2-vl-7b bf16,gptq-int4 512 1,6144 compile   (speed: static cache + CUDA graphs)
#             bench qwen2-vl-7b bf16,gptq-int4,awq,gptq-int8 64 1 eager   (as published: dynamic cache, no graphs)
#
# Results go to $OUT (the device tool's folder that comes back) or out/gpu: JSON, logs, PNG. Commit them under
# benchmarks/results/ with the GPU named, and put the tables in the README.
#
# The device image has torch, triton and an older transformers; qvlquant runs from this checkout (PYTHONPATH).
# Carry a transformers wheel as the device README says (.whl/, pip download --no-deps transformers==5.23.0 ...);
# it is installed to /tmp/site when present.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 QVLQUANT_QUIET=1
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")

case "${1:-env}" in
  env)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
    ;;
  test)
    # the compile report test needs Triton >= 3.8's AOT helpers; it says nothing a GPU run does not
    python3 -m pytest -q tests/kernels tests/quant/test_formats.py "tests/tools/test_bench.py::test_fused_kernel_path_under_torch_compile_matches_eager" \
      -k "not compile_for" -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu.log"
    ;;
  kernels)
    python3 benchmarks/bench_dequant_matmul.py --json "$OUT/kernels_$gpu.json" 2>&1 | tee "$OUT/kernels_$gpu.log"
    ;;
  bench)
    shape=${2:-qwen2-vl-7b}
    variants=${3:-bf16,gptq-int4}
    tokens=${4:-512}
    lengths=${5:-1,6144}
    mode=${6:-compile}
    flag=$([ "$mode" = compile ] && echo --compile || true)  # eager: dynamic KV cache, as published
    name="bench_${shape}_${variants//,/_}_${lengths//,/_}_${mode}_$gpu"
    python3 -m qvlquant.cli bench --shape "$shape" --variants "$variants" --new-tokens "$tokens" \
      --input-lengths "$lengths" $flag --json "$OUT/$name.json" --plot "$OUT/$name.png" 2>&1 | tee "$OUT/$name.log"
    ;;
  *)
    echo "unknown step ${1}: env | test | kernels | bench SHAPE VARIANTS TOKENS [LENGTHS] [compile|eager]" >&2
    exit 2
    ;;
esac
