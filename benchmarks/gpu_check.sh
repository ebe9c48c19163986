#!/usr/bin/env bash
# The CUDA paths in one go, on one GPU, in about 8 minutes: tests on CUDA, 200 training steps with bf16 and with
# --compile, training/generation/evaluation speed; one table at the end (also in gpu_check.md).
#   bash benchmarks/gpu_check.sh            (from the repository root, in the environment of the README)
# Nothing here has run yet where this was written (no GPU was lent): the first run is the check.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
table="$out/gpu_check.md"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
row() { printf '| %s | %s | %s |\n' "$1" "$2" "$3" >> "$table"; }
printf '| check | result | detail |\n|---|---|---|\n' > "$table"

# 1. the tests: the CUDA file (every variant's forward and cached decoding against the CPU in float64, bf16
#    training, ragged generation), then the whole suite (CPU paths, to see nothing broke on this machine)
start=$SECONDS
timeout 180 python -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$out/test_cuda.log" 2>&1
row "tests/test_cuda.py" "exit $?" "$(tail -1 "$out/test_cuda.log") ($((SECONDS - start)) s)"
start=$SECONDS
timeout 300 python -m pytest -q -x -p no:cacheprovider -k "not reliability" > "$out/tests.log" 2>&1
row "test suite (no reliability subprocesses)" "exit $?" "$(tail -1 "$out/tests.log") ($((SECONDS - start)) s)"

# 2. 200 training steps of the default preset on the GPU: bf16, then bf16 + torch.compile
for flags in "--bf16" "--bf16 --compile"; do
  name=$(echo "$flags" | tr -d ' -')
  rm -rf "$out/run-$name"
  start=$SECONDS
  timeout 150 brt train --device cuda $flags --max-steps 200 --eval-every 100 --checkpoint-every 100 --no-progress \
    --out-dir "$out/run-$name" > "$out/train-$name.log" 2>&1
  status=$?
  rate=$(python -c "import json,sys; r=[json.loads(l) for l in open('$out/run-$name/metrics.jsonl') if 'tokens_per_s' in l]; print(f\"{r[-1]['tokens_per_s']:.0f} tok/s, train bpb {r[-1]['bpb']:.3f}\")" 2>/dev/null)
  row "brt train $flags, 200 steps" "exit $status" "${rate:-no metrics} ($((SECONDS - start)) s)"
done

# 3. speed: ours on CUDA (float32 and bf16 autocast), training and decoding, with the reference where installed
timeout 180 python - > "$out/speed.log" 2>&1 <<'PY'
import time, torch
from block_recurrent import BlockRecurrentTransformer, RecurrentTrainerWrapper
from block_recurrent.generation import generate
SMALL = dict(num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, block_width=128, max_seq_len=256,
             num_state_vectors=128, recurrent_layers=(2,), gate_projection=True)
def train_rate(bf16):
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(**SMALL).cuda(); wrapper = RecurrentTrainerWrapper(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4); seq = torch.randint(0, 256, (16, 4 * 256 + 1), device="cuda")
    times = []
    for step in range(6):
        torch.cuda.synchronize(); t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            wrapper.forward_backward(seq)
        opt.step(); opt.zero_grad(set_to_none=True); torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    return 16 * 4 * 256 / min(times[1:])
def decode_rate(batch, compile=False):
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(**SMALL).cuda().eval(); prompt = torch.randint(0, 256, (batch, 16), device="cuda")
    generate(model, prompt, 32, temperature=0, compile=compile); torch.cuda.synchronize(); t = time.perf_counter()
    generate(model, prompt, 512, temperature=0, compile=compile); torch.cuda.synchronize()
    return batch * 512 / (time.perf_counter() - t)
print(f"| training tok/s, small, 16 x 4 x 256, float32 | {train_rate(False):.0f} | ours, CUDA |")
print(f"| training tok/s, same, bf16 autocast | {train_rate(True):.0f} | ours, CUDA |")
for b in (1, 8, 32):
    print(f"| decoding tok/s, batch {b}, greedy | {decode_rate(b):.0f} | ours, CUDA |")
print(f"| decoding tok/s, batch 1, greedy, compile=True | {decode_rate(1, compile=True):.0f} | ours, CUDA (compiled once before timing) |")
PY
cat "$out/speed.log" | grep '^|' >> "$table"
cat "$table"
