#!/usr/bin/env bash
# The GPU checks, as one script to run by hand on a CUDA machine from the repository root:
#
#     bash bench/gpu_check.sh            # about 5 minutes on one recent GPU
#
# Prints: the GPU; the tests (torchrun/DDP and the model's loss and gradients); bench.py on the
# GPU (matmul peaks, training chars/s and MFU, sampling chars/s); bf16 against fp32 validation
# loss at the same step count; a model trained on the GPU sampling on the CPU and on the GPU.
# Every check runs even when one before it fails (a first run on new hardware should show all
# that is wrong at once); the script exits non-zero if any failed and names them at the end.
set -uo pipefail
failed=()
check() {  # check NAME COMMAND...: run one check, print its outcome, remember a failure
  local name=$1; shift
  echo "== $name" >&2
  if "$@"; then echo "== $name: ok" >&2; else echo "== $name: FAILED (exit $?)" >&2; failed+=("$name"); fi
}

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device here'; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)" || exit 1
check tests python -m pytest -q tests/test_distributed.py tests/test_model.py
check bench python bench/bench.py --device cuda --repeats 3

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
corpus=${CORPUS:-../shared/corpora/muchin1000_lyrics.txt}
if [ ! -f "$corpus" ]; then  # no shared corpora on this machine: the bundled model writes one
  corpus=$tmp/corpus.txt
  python -m rnngen sample --device cpu --length 300000 --random-seed 1 > "$corpus"
fi
for precision in fp32 bf16; do
  check "train $precision" python -m rnngen train "$corpus" --out "$tmp/$precision" --device cuda \
    --precision "$precision" --max-steps 300 --eval-every 100 -q
  [ -f "$tmp/$precision/config.json" ] &&  # not after a failed run: its failure is already named
    python -c "import json,sys; r=json.load(open(sys.argv[1]))['result']; print(sys.argv[2], 'best val bits/char', r['best_val_bpc'], 'after', r['steps'], 'steps,', r['train_seconds'], 's')" "$tmp/$precision/config.json" "$precision"
done
check "sample cpu" python -m rnngen sample --model "$tmp/bf16" --device cpu --seed 我 --length 60 --random-seed 3
check "sample cuda" python -m rnngen sample --model "$tmp/bf16" --device cuda --seed 我 --length 60 --random-seed 3
check "evaluate cpu" python -m rnngen evaluate --model "$tmp/bf16" --device cpu --json
check "evaluate cuda" python -m rnngen evaluate --model "$tmp/bf16" --device cuda --json

if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]}" >&2; exit 1; fi
echo "all GPU checks passed" >&2
