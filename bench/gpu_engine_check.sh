#!/usr/bin/env bash
# One device call's worth of GPU checks for the engine (issue 18), run from the repository root on a CUDA
# machine whose image has torch, triton, grpcio, protobuf and uvloop but not the rest of our dependencies:
#
#   device run, carry [".whl", "tandem/v1"], command "bash bench/gpu_engine_check.sh"
#
# .whl holds cp312 wheels of what the image lacks (pyzmq, opentelemetry-*, llguidance, gguf, grpcio and
# protobuf at our generated code's versions; docs/benchmarks.md, "GPU", lists them); tandem/v1 is the
# generated protobuf code (`python -m protos.generate` here). Stages run in priority order, each under the
# time left ($BUDGET seconds in all), and write logs and JSON to $RES, packed at the end (on any exit) into
# $OUT/gpu_results.tgz ($OUT: the device tool's folder; bench/results/gpu when unset):
#   1. the Triton kernel tests compiled on the GPU (bfloat16 included) and the engine against transformers
#   2. bench.overhead, near-free model, batch 1..512, overlap and serial, with the B=256 phases
#   3. bench.overhead on a random Llama-3.2-1B-shaped model (bfloat16): host work against a real forward
#   4. bench.offline on the GPU: Tandem against transformers (random 50M Llama, 64 prompts)
#   5. bench.kernel_speed and bench.quant_gpu (the GPU targets of issues 4 and 6)
set -u
OUT=${OUT:-bench/results/gpu}
RES=${RES:-/tmp/gpu_results}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT" "$RES"
trap 'tar czf "$OUT/gpu_results.tgz" -C "$RES" . && echo "packed $(ls "$RES" | wc -l) files"' EXIT
START=$SECONDS
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    >"$RES/install.log" 2>&1 || { tail "$RES/install.log"; exit 1; }
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
export PYTHONUNBUFFERED=1 TANDEM_CACHE_DIR=/tmp/tandem-cache
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$RES/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$RES/gpu.txt"

stage() {  # stage NAME CAP_SECONDS COMMAND...: runs COMMAND under min(CAP, time left), logs to $RES/NAME.log
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local t=$(( cap < left ? cap : left ))
  if [ "$t" -lt 15 ]; then echo "== $name: skipped (${left}s left)"; return; fi
  echo "== $name (up to ${t}s, $((SECONDS - START))s in)"
  timeout "$t" "$@" >"$RES/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - START))s"
  tail -n 25 "$RES/$name.log"
}

CPU_ONLY="--ignore=tests/kernels/test_paged_attention_cpu.py --ignore=tests/kernels/test_layer_ops_cpu.py
  --ignore=tests/kernels/test_int8_group_gemm_cpu.py --ignore=tests/kernels/test_onednn_linear.py"
# shellcheck disable=SC2086
stage tests 170 python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 120 tests/kernels $CPU_ONLY \
  tests/engine/test_gpu_vs_hf.py \
  tests/engine/test_sampling.py::test_cuda_matches_cpu_distribution_and_reproduces_seeds \
  tests/kvtransfer/test_kv_transfer.py::test_cuda_pools_transfer_byte_exact
stage overhead_nearfree 70 python3 -m bench.overhead --device cuda --batch-sizes 1,32,128,256,512 \
  --steps 40 --profile "" --phases 256 --out "$RES/overhead_nearfree.json"
stage make_1b 60 python3 -m cli.main make-tiny-model /tmp/llama1b --arch llama --hidden-size 2048 --layers 16 \
  --heads 32 --kv-heads 8 --intermediate-size 8192 --vocab-size 32000 --dtype bfloat16
stage overhead_1b 110 python3 -m bench.overhead --device cuda --model /tmp/llama1b --batch-sizes 1,64,256 \
  --steps 30 --profile "" --phases 256 --out "$RES/overhead_1b.json"
stage offline 100 python3 -m bench.offline --device cuda --hf-batch-sizes 16,64 --out "$RES/offline.json"
stage kernel_speed 50 python3 -m bench.kernel_speed --out "$RES/kernel_speed.json"
stage quant_gpu 120 python3 -m bench.quant_gpu --out "$RES/quant_gpu.json"
echo "done in $((SECONDS - START))s"
