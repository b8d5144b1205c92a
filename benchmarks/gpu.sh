#!/usr/bin/env bash
# Issue 13's GPU measurements in one device call (benchmarks/README.md, "On a GPU").
#   bash benchmarks/gpu.sh prepare     # here, once: wheels into .whl/, photos into .gpu/
#   bash benchmarks/gpu.sh run         # there: run(command="bash benchmarks/gpu.sh run", carry=[".whl", ".gpu"])
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  mkdir -p .whl .gpu
  # What the device machine lacks for logger=none (it has torch, timm, numpy, opencv-python-headless).
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    mmcv-lite==2.2.0 mmengine==0.10.7 hydra-core==1.3.8 omegaconf==2.3.1 addict==2.4.0 yapf==0.43.0 termcolor==3.3.0 platformdirs==4.14.9 || exit
  ls .whl/antlr4_python3_runtime-*.whl >/dev/null 2>&1 || python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 || exit
  rm -rf .gpu/voc-sample && cp -r ../shared/data/voc-sample .gpu/voc-sample
  du -sh .whl .gpu
  ;;
run)
  OUT=${OUT:-runs/gpu}
  mkdir -p "$OUT"
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONUNBUFFERED=1 WANDB_MODE=disabled WANDB_ERROR_REPORTING=false
  ROOT=.gpu/voc-sample/VOCdevkit/VOC2012
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/environment.txt"
  PEAK=${PEAK_TFLOPS:-989}  # dense bf16 peak of an H100/H200 SXM; pass PEAK_TFLOPS for another card
  for amp in "" "--amp"; do
    name=speed${amp:+_bf16}
    timeout 240 python3 benchmarks/speed.py --device cuda $amp --iterations 20 --eval-images 48 --eval-root "$ROOT" \
      --profile --peak-tflops "$PEAK" --out "$OUT/$name.json" 2>&1 | grep -v " | INFO | " | tee "$OUT/$name.txt"
  done
  timeout 120 python3 benchmarks/bench_ops.py --device cuda 2>&1 | tee "$OUT/bench_ops.txt"
  ;;
*)
  echo "usage: bash benchmarks/gpu.sh prepare|run" >&2; exit 2
  ;;
esac
