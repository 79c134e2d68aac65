#!/usr/bin/env bash
# One device call's worth of GPU checks for the engine (issue 18), run from the repository root on a CUDA
# machine whose image has torch, triton, grpcio, protobuf and uvloop but not the rest of our dependencies:
#
#   device run, carry [".whl", "tandem/v1"], command "bash bench/gpu_engine_check.sh"
#
# .whl holds cp312 wheels of what the image lacks (pyzmq, opentelemetry-*, llguidance, gguf, grpcio and
# protobuf at our generated code's versions; docs/benchmarks.md, "GPU", lists them); tandem/v1 is the
# generated protobuf code (`python -m protos.generate` here). $STAGES names the stages to run (default: the
# first call's list below), in order, each under the time left ($BUDGET seconds in all); logs and JSON go
# to $RES, packed at the end (on any exit) into $OUT/gpu_results.tgz ($OUT: the device tool's folder):
#   tests              the Triton kernel tests compiled on the GPU (bfloat16 included), the engine against
#                      transformers and CUDA graphs against eager steps (engine_tests: the engine's alone)
#   overhead_nearfree  bench.overhead, near-free model, batch 1..512, overlap and serial, B=256 phases
#   make_1b, overhead_1b, overhead_1b_eager   a random Llama-3.2-1B-shaped model (bfloat16): host work
#                      against a real forward, with CUDA graphs and without
#   offline            bench.offline on the GPU: Tandem against transformers (random 50M Llama, 64 prompts)
#   kernel_speed, quant_gpu   the GPU benchmarks of issues 4 and 6
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
STAGES=${STAGES:-tests overhead_nearfree make_1b overhead_1b overhead_1b_eager offline kernel_speed quant_gpu}
for s in $STAGES; do
  case $s in
    # shellcheck disable=SC2086
    tests) stage tests 170 python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 120 tests/kernels $CPU_ONLY \
      tests/engine/test_gpu_vs_hf.py tests/engine/test_cuda_graph.py \
      tests/engine/test_sampling.py::test_cuda_matches_cpu_distribution_and_reproduces_seeds \
      tests/kvtransfer/test_kv_transfer.py::test_cuda_pools_transfer_byte_exact ;;
    engine_tests) stage engine_tests 120 python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 120 \
      tests/engine/test_gpu_vs_hf.py tests/engine/test_cuda_graph.py tests/kernels/test_quant_gemm.py ;;
    overhead_nearfree) stage overhead_nearfree 70 python3 -m bench.overhead --device cuda \
      --batch-sizes 1,32,128,256,512 --steps 40 --profile "" --phases 256 --out "$RES/overhead_nearfree.json" ;;
    overhead_nearfree_serial) stage overhead_nearfree_serial 50 python3 -m bench.overhead --device cuda \
      --batch-sizes 1,32,256,512 --modes serial --steps 40 --profile "" --out "$RES/overhead_nearfree_serial.json" ;;
    make_1b) stage make_1b 60 python3 -m cli.main make-tiny-model /tmp/llama1b --arch llama --hidden-size 2048 \
      --layers 16 --heads 32 --kv-heads 8 --intermediate-size 8192 --vocab-size 32000 --dtype bfloat16 ;;
    overhead_1b) stage overhead_1b 110 python3 -m bench.overhead --device cuda --model /tmp/llama1b \
      --batch-sizes 1,64,256 --steps 30 --profile "" --phases 256 --out "$RES/overhead_1b.json" ;;
    overhead_1b_eager) stage overhead_1b_eager 80 python3 -m bench.overhead --device cuda --model /tmp/llama1b \
      --eager --batch-sizes 1,64,256 --modes serial --steps 30 --profile "" --out "$RES/overhead_1b_eager.json" ;;
    offline) stage offline 100 python3 -m bench.offline --device cuda --hf-batch-sizes 16,64 --out "$RES/offline.json" ;;
    offline_tandem) stage offline_tandem 60 python3 -m bench.offline --device cuda --skip-hf --out "$RES/offline_tandem.json" ;;
    kernel_speed) stage kernel_speed 50 python3 -m bench.kernel_speed --out "$RES/kernel_speed.json" ;;
    quant_gpu) stage quant_gpu 120 python3 -m bench.quant_gpu --out "$RES/quant_gpu.json" ;;
    *) echo "unknown stage $s" ;;
  esac
done
echo "done in $((SECONDS - START))s"
