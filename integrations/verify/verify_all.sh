#!/usr/bin/env bash
# Verifies the four integration patches on their pinned upstream commits, on a CPU.
#
# For each repository: extract the pinned commit, check the patch round trip (apply, apply again,
# revert, compare bytes), count the upstream lines changed, then train for two short epochs with
# the unpatched script, the patched script at --beta-prime 0 and at --beta-prime 2, and compare
# the printed losses. See integrations/README.md.
#
# Environment:
#   SOURCES   folder with git clones (or bare mirrors) named TRADES, MART, hat, ST-AT; a missing
#             one is cloned from GitHub (default: $WORK/sources)
#   WORK      scratch folder (default: /tmp/memloss-verify); it is recreated
#   PYTHON    interpreter that imports memloss_addon and torchvision (default: python)
#   EXTRA_PYTHONPATH  added to PYTHONPATH for the HAT runs (where pandas is, if not installed)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${WORK:-/tmp/memloss-verify}"
SOURCES="${SOURCES:-$WORK/sources}"
PYTHON="${PYTHON:-python}"
RUN="$PYTHON $HERE/run_with_standins.py --fake-data"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONHASHSEED=0

declare -A URL=(
  [trades]=https://github.com/yaodongyu/TRADES [mart]=https://github.com/YisenWang/MART
  [hat]=https://github.com/imrahulr/hat [st]=https://github.com/qizhangli/ST-AT)
declare -A DIR=([trades]=TRADES [mart]=MART [hat]=hat [st]=ST-AT)
declare -A COMMIT=(
  [trades]=6e8e11b7c281371c2f027ffadfbaea80361f09de [mart]=2d83e17b381dd2ee52223695e517bf6d5ff09c2c
  [hat]=3177a4f827480e97ac8ea4c5c6acab197cf97e66 [st]=82fc69ffec8963c364a56f41c245cdb8861d1738)
# Lines compared between runs: the per-batch or per-epoch losses and the evaluation results.
declare -A COMPARED=(
  [trades]='Loss:|Average loss' [mart]='Loss:|natural_acc|robust_acc'
  [hat]='^Loss:|Accuracy-' [st]='Loss:|accuracy')

rm -rf "$WORK/runs" "$WORK/logs" && mkdir -p "$WORK/runs" "$WORK/logs" "$SOURCES"
"$PYTHON" "$HERE/make_fake_cifar10.py" "$WORK/runs/data" --train 200 --test 100 >/dev/null
ln -s data "$WORK/runs/data_attack"                      # MART reads ../data_attack
mkdir -p "$WORK/runs/hatdata" && ln -s ../data "$WORK/runs/hatdata/cifar10"

extract() {  # extract NAME DEST: the pinned commit's files
  local src="$SOURCES/${DIR[$1]}"
  [ -e "$src" ] || git clone --quiet "${URL[$1]}" "$src"
  mkdir -p "$2" && git -C "$src" archive "${COMMIT[$1]}" | tar -x -C "$2"
}

losses() {  # losses NAME LOG: the compared lines, without timestamps
  grep -E "${COMPARED[$1]}" "$2" | sed -E 's/^[0-9-]+ [0-9:,]+ \| //'
}

loss_values() {  # loss_values LOG: "where<TAB>loss" for every printed training loss
  grep -E 'Loss: ' "$1" | sed -E 's/^[0-9-]+ [0-9:,]+ \| //' | awk '
    /Epoch: / { match($0, /Epoch: [0-9]+ \[[0-9]+/); where = substr($0, RSTART + 7, RLENGTH - 7) "]" }
    !/Epoch: / { epochs += 1; where = "epoch " epochs }
    { match($0, /Loss: [0-9.]*[0-9]/); printf "%s\t%s\n", where, substr($0, RSTART + 6, RLENGTH - 6) }'
}

run_trades() {  # run_trades CHECKOUT LOG [FLAGS...]
  local dir=$1 log=$2; shift 2
  (cd "$dir" && $RUN --tiny-model trades $STANDIN train_trades_cifar10.py --epochs 2 \
     --batch-size 32 --test-batch-size 100 --log-interval 1 "$@" >"$log" 2>&1)
}
run_mart() {
  local dir=$1 log=$2; shift 2
  (cd "$dir" && $RUN --tiny-model mart $STANDIN train_wideresnet.py --epochs 2 \
     --batch-size 32 --test-batch-size 100 --log-interval 1 "$@" >"$log" 2>&1)
}
run_st() {  # ST-AT accepts only 80 or 120 epochs (they select its schedule): stop after two
  local dir=$1 log=$2; shift 2
  ln -sfn ../data "$dir/data"
  (cd "$dir" && $RUN --tiny-model st $STANDIN --stop-after-epochs 2 train_stat.py --epochs 80 \
     --batch-size 32 --test-batch-size 100 --log-interval 1 --beta 6 --num_workers 0 \
     --model-dir results/verify "$@" >"$log" 2>&1)
}
run_hat() {  # HAT needs a standard-trained helper model: one epoch, unpatched, shared by all runs
  local dir=$1 log=$2; shift 2
  local logs="$WORK/runs/hatlogs-$(basename "$dir")"
  mkdir -p "$logs" && cp -r "$WORK/runs/hat-helper/helper" "$logs/"
  (cd "$dir" && PYTHONPATH="${PYTHONPATH:-}:${EXTRA_PYTHONPATH:-}" $RUN --tiny-model hat \
     --pandas-append --stub robustness.datasets --stub autoattack.autopgd_base $STANDIN train.py \
     --data-dir "$WORK/runs/hatdata" --log-dir "$logs" --tmp-dir "$WORK/runs/hattmp" \
     --data cifar10 -m resnet18 --batch-size 32 --batch-size-validation 100 \
     --num-samples-eval 50 --seed 1 --desc hat -na 2 --helper-model helper --beta 2.5 \
     --gamma 0.5 --h 2 "$@" >"$log" 2>&1)
  cp "$logs/hat/stats_adv.csv" "${log%.txt}.csv"
}

summary="$WORK/logs/SUMMARY.txt"; : >"$summary"
for name in trades mart hat st; do
  pristine="$WORK/runs/pristine-$name"
  extract "$name" "$pristine"

  # Patch round trip on a scratch copy: apply, apply again (no-op), revert, compare bytes.
  trip="$WORK/runs/roundtrip-$name"; cp -r "$pristine" "$trip"
  "$PYTHON" -m memloss_addon.experiments.patching "$name" "$trip" >>"$WORK/logs/patch-$name.txt"
  "$PYTHON" -m memloss_addon.experiments.patching "$name" "$trip" >>"$WORK/logs/patch-$name.txt"
  "$PYTHON" -m memloss_addon.experiments.patching "$name" "$trip" --revert >>"$WORK/logs/patch-$name.txt"
  diff -r "$pristine" "$trip" >/dev/null && roundtrip=exact || roundtrip=DIFFERENT

  unpatched="$WORK/runs/unpatched-$name"; patched="$WORK/runs/patched-$name"
  cp -r "$pristine" "$unpatched"; cp -r "$pristine" "$patched"
  "$PYTHON" -m memloss_addon.experiments.patching "$name" "$patched" >>"$WORK/logs/patch-$name.txt"
  changed=$( (cd "$WORK/runs" && git diff --no-index --numstat "pristine-$name" "patched-$name" \
    || true) | grep -v -E 'memloss_shim.py|\.memloss-patch.json' | awk '{s += $1 + $2} END {print s}')

  if [ "$name" = hat ]; then  # the helper model, trained once by the unpatched code
    helper="$WORK/runs/hat-helper"; mkdir -p "$helper"
    (cd "$unpatched" && PYTHONPATH="${PYTHONPATH:-}:${EXTRA_PYTHONPATH:-}" $RUN --tiny-model hat \
       --pandas-append --stub robustness.datasets --stub autoattack.autopgd_base --cuda-to-cpu \
       train.py --data-dir "$WORK/runs/hatdata" --log-dir "$helper" \
       --tmp-dir "$WORK/runs/hattmp" --data cifar10 -m resnet18 --batch-size 32 \
       --batch-size-validation 100 --num-samples-eval 50 --seed 1 --desc helper -ns 1 \
       >"$WORK/logs/hat-helper.txt" 2>&1)
  fi
  STANDIN=--cuda-to-cpu "run_$name" "$unpatched" "$WORK/logs/$name-unpatched.txt"
  STANDIN= "run_$name" "$patched" "$WORK/logs/$name-beta0.txt" --beta-prime 0
  rm -rf "$patched/results" "$WORK/runs/hatlogs-patched-$name"
  STANDIN= "run_$name" "$patched" "$WORK/logs/$name-beta2.txt" --beta-prime 2

  if diff <(losses "$name" "$WORK/logs/$name-unpatched.txt") \
          <(losses "$name" "$WORK/logs/$name-beta0.txt") >/dev/null; then same=identical
  else same=DIFFERENT; fi
  if [ "$name" = hat ] && ! cmp -s "$WORK/logs/hat-unpatched.csv" "$WORK/logs/hat-beta0.csv"
  then same="$same (stats_adv.csv DIFFERENT)"; fi
  {
    echo "== $name (${COMMIT[$name]:0:12}): $changed upstream lines changed; round trip $roundtrip"
    echo "   beta'=0 vs unpatched: $same"
    paste <(loss_values "$WORK/logs/$name-unpatched.txt") \
          <(loss_values "$WORK/logs/$name-beta0.txt") <(loss_values "$WORK/logs/$name-beta2.txt") \
      | awk -F'\t' '{printf "   %-16s unpatched %s  beta0 %s  beta2 %s\n", $1, $2, $4, $6}'
  } | tee -a "$summary"
done
echo "logs: $WORK/logs"
