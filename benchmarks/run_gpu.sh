#!/usr/bin/env bash
# One device call: environment, GPU tests, kernel timings, FFN and block benchmarks.
#   STEPS="env tests kernels ffn block" OUT=/tmp/out bash benchmarks/run_gpu.sh
# (also: llm -- bench_llm.py; zoo -- tests/test_zoo.py on this machine's transformers; ops -- tests/test_triton_ops_gpu.py (triton_op, symbolic M, AOTI); int8norms -- int8 GEMMs, and fp8-out norms: inductor vs hand Triton; diag -- host overhead; gemm -- decode-sized GEMM candidates, cold L2; gated -- the gated requantise's statistics pass, tilings and variants; dattn -- float8 decode attention tests + timings; aoti -- where the AOTI round trip crashes)
# Each step has its own time cap, so a slow step never loses the ones after it.
# Logs land in $OUT (tests.log, kernels.log, ffn.log, block.log, errors.log).
# *_ARGS and TEST_ARGS are split on spaces (quotes inside them are not honoured): give --skip
# single-word substrings, e.g. FFN_ARGS="--m 1024 --skip rowwise in-bench".
set -u
OUT=${OUT:-/tmp/fxscale-out}
mkdir -p "$OUT"
STEPS=${STEPS:-"env tests kernels ffn block"}
if ls .whl/*.whl >/dev/null 2>&1; then  # torchao, carried as a wheel (see the device README)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
# torch.compile's on-disk caches do not notice changes to fxscale's op bodies or its inductor
# lowering (pytorch#144344): one cache directory per version of the sources.
SRC_HASH=$(find fxscale passes -name '*.py' | sort | xargs cat | sha1sum | cut -c1-12)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor_fxscale_$SRC_HASH}
for s in $STEPS; do
  echo "=== $s $(date +%T)"
  case $s in
    env)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
      python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1
      ;;
    tests)
      timeout "${T_TESTS:-300}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py ${TEST_ARGS:-} \
        > "$OUT/tests.log" 2>&1
      grep -E "passed|failed|error|FAILED|Error" "$OUT/tests.log" | tail -25
      ;;
    ops)  # the triton_op GEMM, its lowering with a symbolic M, the AOTI package round trip
      timeout "${T_OPS:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_triton_ops_gpu.py ${OPS_ARGS:-} \
        > "$OUT/ops.log" 2>&1
      grep -E "passed|failed|error|FAILED|Error" "$OUT/ops.log" | tail -25
      ;;
    llm)  # the Llama-3-8B-shaped model: prefill / decode / accuracy (benchmarks/bench_llm.py)
      timeout "${T_LLM:-420}" python3 benchmarks/bench_llm.py --md "$OUT/llm.md" ${LLM_ARGS:-} > "$OUT/llm.log" 2>&1
      grep -E "^(\\| |ISSUE14|!!|   fxscale)" "$OUT/llm.log" | head -60; tail -3 "$OUT/llm.log"
      ;;
    zoo)  # the external model zoo on the GPU machine's transformers (other code paths than the CPU's)
      FXSCALE_ZOO_DEVICE=${ZOO_DEVICE:-cpu} timeout "${T_ZOO:-240}" python3 -m pytest -q -p no:cacheprovider -m zoo \
        tests/test_zoo.py ${ZOO_ARGS:-} > "$OUT/zoo.log" 2>&1
      grep -E "passed|failed|FAILED|Error" "$OUT/zoo.log" | tail -30
      ;;
    kernels)
      timeout "${T_KERNELS:-180}" python3 benchmarks/bench_kernels.py ${KERNEL_ARGS:-} > "$OUT/kernels.log" 2>&1
      grep -E "^\| " "$OUT/kernels.log" | sort -u | head -80; tail -3 "$OUT/kernels.log"
      ;;
    int8norms)
      timeout "${T_INT8:-240}" python3 benchmarks/bench_int8_norms.py --md "$OUT/int8_norms.md" ${INT8_ARGS:-} \
        > "$OUT/int8_norms.log" 2>&1
      grep -E "^\| " "$OUT/int8_norms.log" | sort -u | head -40; tail -3 "$OUT/int8_norms.log"
      ;;
    aoti)  # where the AOTI round trip crashes (benchmarks/diag_aoti.py: one process per variant)
      timeout "${T_AOTI:-400}" python3 benchmarks/diag_aoti.py --md "$OUT/aoti.md" ${AOTI_ARGS:-} > "$OUT/aoti.log" 2>&1
      grep -E "^[|] " "$OUT/aoti.log"; tail -3 "$OUT/aoti.log"
      ;;
    dattn)  # the float8 decode attention: GPU tests, then its timings (benchmarks/bench_decode_attention.py)
      timeout "${T_DATTN_TESTS:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py > "$OUT/dattn_tests.log" 2>&1
      grep -E "passed|failed|error|FAILED|Error" "$OUT/dattn_tests.log" | tail -15
      timeout "${T_DATTN:-120}" python3 benchmarks/bench_decode_attention.py ${DATTN_ARGS:-} > "$OUT/dattn.log" 2>&1
      grep -E "^[|] " "$OUT/dattn.log"; tail -3 "$OUT/dattn.log"
      ;;
    gemm)  # decode-sized GEMMs, every candidate, cold L2 (benchmarks/diag_decode_gemm.py)
      timeout "${T_GEMM:-200}" python3 benchmarks/diag_decode_gemm.py --md "$OUT/gemm.md" ${GEMM_ARGS:-} > "$OUT/gemm.log" 2>&1
      grep -E "^[|] " "$OUT/gemm.log"; tail -3 "$OUT/gemm.log"
      ;;
    gated)  # the gated requantise's statistics pass: tilings and a float32-squares variant (benchmarks/diag_gated.py)
      timeout "${T_GATED:-150}" python3 benchmarks/diag_gated.py --md "$OUT/gated.md" ${GATED_ARGS:-} > "$OUT/gated.log" 2>&1
      grep -E "^([|] |###|whole)" "$OUT/gated.log" | head -60; tail -3 "$OUT/gated.log"
      ;;
    diag)
      timeout "${T_DIAG:-150}" python3 benchmarks/diag_overhead.py > "$OUT/diag.log" 2>&1
      grep -E "us/call|kernels per call| us  x" "$OUT/diag.log" | head -70; tail -3 "$OUT/diag.log"
      ;;
    ffn)
      timeout "${T_FFN:-420}" python3 benchmarks/bench_ffn.py --log "$OUT/errors.log" ${FFN_ARGS:-} > "$OUT/ffn.log" 2>&1
      grep -E "^(  |M=|FFN|- |WARN)" "$OUT/ffn.log" | head -120; tail -3 "$OUT/ffn.log"
      ;;
    block)
      timeout "${T_BLOCK:-300}" python3 benchmarks/bench_block.py --log "$OUT/errors.log" ${BLOCK_ARGS:-} > "$OUT/block.log" 2>&1
      grep -E "^(  |B=|GPT)" "$OUT/block.log" | head -60; tail -3 "$OUT/block.log"
      ;;
  esac
done
echo "=== done $(date +%T)"
