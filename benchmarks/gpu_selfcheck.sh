#!/usr/bin/env bash
# The checks only a CUDA machine can make, in at most about 8 minutes on one GPU (each step has a
# time limit, 8.5 minutes in all; a step that runs past its limit counts as failed):
#   1. every test that skips without CUDA (the files using tests.conftest.requires_cuda, with
#      -m skipif: the memory's device paths, device-resident data, and the training fast path
#      of tests/test_fast_path.py)                                                  (limit 150 s)
#      and the fuzz test, whose draws include CUDA batches when CUDA is present;     (limit 90 s)
#   2. benchmarks/buffer_overhead.py --smoke: one short round of every placement, the pinned-CPU
#      and CUDA ones included, at 3x32x32 and batch 128;                             (limit 60 s)
#   3. benchmarks/step_overhead.py in focused mode: a TRADES-10 step of ResNet-18 at batch 128,
#      without memory, with a pinned-CPU fp16 memory and with a GPU fp32 memory (depth 1, every
#      slot filled), float32 training, wall time with the GPU synchronised around each step, 20
#      repetitions interleaved in rotating order;                                    (limit 60 s)
#   4. 200 training steps of the TRADES WRN-34-10 CIFAR-10 preset (TRADES-10, batch 128) on
#      synthetic CIFAR-shaped uint8 data held on the GPU, with bf16 autocast and channels_last,
#      without and with MemLoss (a float32 memory pinned on the CPU, the default), through
#      python -m memloss_addon.experiments.preset_timing: the steady step time after 20 warm-up
#      steps, images per second, and the estimated time of one CIFAR-10 epoch.     (limit 150 s)
# Then it writes every figure into one JSON, gpu_selfcheck.json, and checks the targets:
#   - TRADES-10 ResNet-18 step with a memory at most 1.08 x the step without (each placement);
#   - the pinned-CPU fp16 memory's step at most 1.01 x the GPU fp32 memory's (at most 1% slower).
# Results go to $OUT if set, else benchmarks/results/gpu_selfcheck/. Without CUDA it prints one
# line and exits with 77 (skipped). Exit status: 0 when every step ran and every target holds,
# 1 when a step failed (after running all of them), 3 when the steps ran but a target missed.
#
# GPU_SELFCHECK_REHEARSAL=1 runs steps 3 and 4 on the CPU at toy sizes (placements cpu-fp16 and
# cpu-fp32 stand in for pinned-fp16 and gpu-fp32) and writes the same JSON: it checks the
# script's plumbing on a machine without a GPU; its numbers mean nothing.
#
# Usage: bash benchmarks/gpu_selfcheck.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
REHEARSAL=${GPU_SELFCHECK_REHEARSAL:-0}

if [ "$REHEARSAL" != 1 ] \
    && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_selfcheck: CUDA is not available here; nothing to check (exit 77)"
    exit 77
fi

results=${OUT:-benchmarks/results/gpu_selfcheck}
mkdir -p "$results"
failed=0
started=$(date +%s)
declare -A status

# run NAME LIMIT_SECONDS COMMAND...: runs a step with a time limit, its output in NAME.txt.
run() {
    local name=$1 limit=$2
    shift 2
    echo "gpu_selfcheck: $name (limit ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" > >(tee "$results/$name.txt") 2>&1
    local rc=$?
    status[$name]=$rc
    if [ "$rc" != 0 ]; then
        failed=1
        [ "$rc" = 124 ] && echo "gpu_selfcheck: $name ran past ${limit} s" | tee -a "$results/$name.txt"
    fi
}

if [ "$REHEARSAL" = 1 ]; then
    device=cpu
    pinned_config=cpu-fp16
    gpu_config=cpu-fp32
    step_args=(--smoke)
    preset_args=(--steps 4 --warmup 2 --batch-size 8 --set widen_factor=1 steps=2)
    echo "gpu_selfcheck: REHEARSAL on the CPU at toy sizes; the numbers mean nothing"
else
    device=cuda
    pinned_config=pinned-fp16
    gpu_config=gpu-fp32
    step_args=(--batch 128 --reps 20)
    preset_args=(--steps 200 --warmup 20)
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])' \
        | tee "$results/device.txt"
    mapfile -t cuda_files < <(grep -l "requires_cuda" tests/test_*.py)
    run pytest_cuda 150 "$PYTHON" -m pytest -q -rs -p no:cacheprovider -m skipif \
        "${cuda_files[@]}" --junitxml="$results/pytest_cuda.xml"
    run pytest_fuzz 90 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_fuzz.py \
        --junitxml="$results/pytest_fuzz.xml"
    run buffer_overhead 60 "$PYTHON" benchmarks/buffer_overhead.py --smoke \
        --json "$results/buffer_overhead.json"
fi

run step_overhead 60 "$PYTHON" benchmarks/step_overhead.py --model resnet18 --device "$device" \
    --methods trades --mem-configs "$pinned_config" "$gpu_config" "${step_args[@]}" \
    --json "$results/step_overhead.json"
run preset_timing 150 "$PYTHON" -m memloss_addon.experiments.preset_timing \
    --preset trades-wrn-34-10-cifar10 --device "$device" --amp bf16 --channels-last \
    "${preset_args[@]}" --json "$results/preset_timing.json"

status_json=$(for name in "${!status[@]}"; do printf '"%s": %s, ' "$name" "${status[$name]}"; done)
"$PYTHON" - "$results" "{${status_json%, }}" "$pinned_config" "$gpu_config" "$started" <<'PY'
"""Merge the steps' figures into gpu_selfcheck.json and check the targets."""
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

results, status, pinned, gpu, started = Path(sys.argv[1]), json.loads(sys.argv[2]), *sys.argv[3:]
MEMORY_TARGET, PINNED_TARGET = 1.08, 1.01


def load(name):
    path = results / name
    return json.loads(path.read_text()) if path.is_file() else None


document = {
    "exit_status_of_each_step": status,
    "seconds": round(time.time() - int(started)),
    "device": (results / "device.txt").read_text().strip()
    if (results / "device.txt").is_file()
    else "cpu (rehearsal)",
}
for name in ("pytest_cuda", "pytest_fuzz"):
    junit = results / f"{name}.xml"
    if junit.is_file():
        root = ET.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        document[name] = {
            k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")
        }
for name in ("buffer_overhead", "step_overhead", "preset_timing"):
    document[name] = load(f"{name}.json")

targets = []
step = document["step_overhead"]
if step is not None:
    row = step["rows"][0]
    ms = row["median_ms"]
    for config in (pinned, gpu):
        variant = f"memory {config}"
        if variant in ms:
            ratio = ms[variant] / ms["base"]
            targets.append({
                "target": f"{row['method']} ResNet-18 step with a {config} memory / without",
                "value": ratio, "limit": MEMORY_TARGET, "passed": ratio <= MEMORY_TARGET,
            })
    if f"memory {pinned}" in ms and f"memory {gpu}" in ms:
        ratio = ms[f"memory {pinned}"] / ms[f"memory {gpu}"]
        targets.append({
            "target": f"{row['method']} ResNet-18 step, {pinned} memory / {gpu} memory",
            "value": ratio, "limit": PINNED_TARGET, "passed": ratio <= PINNED_TARGET,
        })
document["targets"] = targets
document["targets_met"] = bool(targets) and all(t["passed"] for t in targets)
timing = document["preset_timing"]
if timing is not None:
    for arm, figures in timing["arms"].items():
        print(
            f"gpu_selfcheck: TRADES WRN-34-10 preset ({arm}): "
            f"{figures['steady_ms_per_step']:.1f} ms/step, {figures['images_per_second']:.0f} "
            f"img/s, a CIFAR-10 epoch about {figures['estimated_cifar10_epoch_seconds'] / 60:.1f} "
            "min"
        )
for t in targets:
    verdict = "PASS" if t["passed"] else "FAIL"
    print(f"gpu_selfcheck: target {t['target']}: {t['value']:.4f} <= {t['limit']} {verdict}")
if not targets:
    print("gpu_selfcheck: no target could be computed (step_overhead gave no figures)")
(results / "gpu_selfcheck.json").write_text(json.dumps(document, indent=2) + "\n")
print(f"gpu_selfcheck: every figure in {results / 'gpu_selfcheck.json'}")
sys.exit(0 if document["targets_met"] else 3)
PY
targets_rc=$?
[ "$targets_rc" != 0 ] && [ "$targets_rc" != 3 ] && failed=1

verdict="every step passed, every target met"
[ "$targets_rc" = 3 ] && verdict="every step passed, a target MISSED"
[ "$failed" != 0 ] && verdict="a step FAILED"
echo "gpu_selfcheck: results in $results ($verdict, $(( $(date +%s) - started )) s)"
[ "$failed" != 0 ] && exit 1
[ "$targets_rc" = 3 ] && exit 3
exit 0
