#!/usr/bin/env bash
# The GPU check in one command (docs/gpu-check.md): W1 reprpo vs TRL, attention kernels, W2 and
# the `gpu` tests, on one CUDA GPU with no internet; results in $OUT (else bench/results/).
#   bash bench/gpu_check.sh                # on the GPU machine, with .gpu_carry carried
#   bash bench/gpu_check.sh --cpu-smoke    # anywhere: tiny shapes on the CPU, proves the script
# Needs torch, transformers, peft, accelerate (the device image has them) and .gpu_carry/ from
# bench/gpu_prepare.sh; our package is not installed: it runs from src/. Wheels in
# .gpu_carry/wheels are installed (no index, no deps) into $GPU_SITE for the modules not there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${GPU_SITE:-/tmp/gpu_site}
todo=()
for whl in .gpu_carry/wheels/*.whl; do
  [ -f "$whl" ] || continue
  mod=$(basename "$whl" | cut -d- -f1)
  "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)" 2>/dev/null || todo+=("$whl")
done
if [ ${#todo[@]} -gt 0 ]; then
  echo "gpu_check: installing carried wheels into $SITE: ${todo[*]##*/}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${todo[@]}" \
    || echo "gpu_check: installing the carried wheels failed; the TRL rows will say why" >&2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" bench/gpu_check.py "$@"
