#!/usr/bin/env bash
# Verifies the integration patches on their pinned upstream commits, on a CPU.
#
# For each patch: extract the pinned commit, check the patch round trip (apply, apply again,
# revert, compare bytes). For each training script it covers: count the upstream lines changed on
# its path, then train for two short epochs with the unpatched script, the patched script at
# --beta-prime 0 and at --beta-prime 2, and at --beta-prime 0 with --mem-attack-init; compare the
# printed losses and evaluation results and the saved model. Then a few option checks
# (robust_overfitting's options, refusals). See integrations/README.md.
#
# Environment:
#   SOURCES   folder with git clones (or bare mirrors) named TRADES, MART, hat, ST-AT,
#             robust_overfitting, AWP; a missing one is cloned from GitHub (default: $WORK/sources)
#   WORK      scratch folder (default: /tmp/memloss-verify); it is recreated
#   PYTHON    interpreter that imports memloss_addon, torchvision and scipy (default: python)
#   EXTRA_PYTHONPATH  added to PYTHONPATH for the HAT runs (where pandas is, if not installed)
#   ONLY      space-separated run labels to verify (default: all; see RUNS below)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${WORK:-/tmp/memloss-verify}"
SOURCES="${SOURCES:-$WORK/sources}"
PYTHON="${PYTHON:-python}"
RUN="$PYTHON $HERE/run_with_standins.py --fake-data"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONHASHSEED=0

declare -A URL=(
  [trades]=https://github.com/yaodongyu/TRADES [mart]=https://github.com/YisenWang/MART
  [hat]=https://github.com/imrahulr/hat [st]=https://github.com/qizhangli/ST-AT
  [robust-overfitting]=https://github.com/locuslab/robust_overfitting
  [awp]=https://github.com/csdongxian/AWP)
declare -A DIR=([trades]=TRADES [mart]=MART [hat]=hat [st]=ST-AT
  [robust-overfitting]=robust_overfitting [awp]=AWP)
declare -A COMMIT=(
  [trades]=6e8e11b7c281371c2f027ffadfbaea80361f09de [mart]=2d83e17b381dd2ee52223695e517bf6d5ff09c2c
  [hat]=3177a4f827480e97ac8ea4c5c6acab197cf97e66 [st]=82fc69ffec8963c364a56f41c245cdb8861d1738
  [robust-overfitting]=c47a25c5e00c8b2bb35488d962c04dd771b7e9af
  [awp]=a7acf5d842fccf1bbb4b91644352ce157d370a26)

# One run label per training script: its patch, the script, the lines compared between runs
# (losses and evaluation results) and the checkpoint compared after the last epoch.
RUNS=(trades mart mart-resnet hat hat-wa st ro-cifar10 ro-svhn ro-cifar100 awp-at awp-trades)
declare -A PATCH=([trades]=trades [mart]=mart [mart-resnet]=mart [hat]=hat [hat-wa]=hat [st]=st
  [ro-cifar10]=robust-overfitting [ro-svhn]=robust-overfitting [ro-cifar100]=robust-overfitting
  [awp-at]=awp [awp-trades]=awp)
declare -A SCRIPT=([trades]=train_trades_cifar10.py [mart]=train_wideresnet.py
  [mart-resnet]=train_resnet.py [hat]=train.py [hat-wa]=train-wa.py [st]=train_stat.py
  [ro-cifar10]=train_cifar.py [ro-svhn]=train_svhn.py [ro-cifar100]=train_cifar100.py
  [awp-at]=AT_AWP/train_cifar10.py [awp-trades]=trades_AWP/train_trades_cifar.py)
EPOCH_LINE='\] - [0-9]+ '  # robust_overfitting / AT-AWP: one line per epoch
declare -A COMPARED=(
  [trades]='Loss:|Average loss' [mart]='Loss:|natural_acc|robust_acc'
  [mart-resnet]='Loss:|natural_acc|robust_acc' [hat]='^Loss:|Accuracy-'
  [hat-wa]='^Loss:|Accuracy-' [st]='Loss:|accuracy' [ro-cifar10]="$EPOCH_LINE"
  [ro-svhn]="$EPOCH_LINE" [ro-cifar100]="$EPOCH_LINE" [awp-at]="$EPOCH_LINE"
  [awp-trades]='Loss:')
declare -A CHECKPOINT=([trades]=model-wideres-epoch2.pt [mart]=model-res-epoch2.pt
  [mart-resnet]=model-res-epoch2.pt [hat]=hat/weights-last.pt [hat-wa]=hat/weights-last.pt
  [st]=ep_cur.pt [ro-cifar10]=model_1.pth [ro-svhn]=model_1.pth [ro-cifar100]=model_1.pth
  [awp-at]=model_1.pth [awp-trades]=ours-model-epoch2.pt)

rm -rf "$WORK/runs" "$WORK/logs" && mkdir -p "$WORK/runs/out" "$WORK/logs" "$SOURCES"
"$PYTHON" "$HERE/make_fake_cifar10.py" "$WORK/runs/data" --train 200 --test 100 >/dev/null
"$PYTHON" "$HERE/make_fake_cifar10.py" "$WORK/runs/data100" --train 200 --test 100 \
  --format cifar100 >/dev/null
"$PYTHON" "$HERE/make_fake_cifar10.py" "$WORK/runs/svhn" --train 200 --test 100 \
  --format svhn >/dev/null
# train-wa.py holds out the first 1024 training images for validation: 1280 leave 256 to train.
"$PYTHON" "$HERE/make_fake_cifar10.py" "$WORK/runs/data1280" --train 1280 --test 100 >/dev/null
ln -s data "$WORK/runs/data_attack"                      # MART reads ../data_attack
mkdir -p "$WORK/runs/hatdata" "$WORK/runs/hatdata-wa"
ln -s ../data "$WORK/runs/hatdata/cifar10"
ln -s ../data1280 "$WORK/runs/hatdata-wa/cifar10"

extract() {  # extract NAME DEST: the pinned commit's files
  local src="$SOURCES/${DIR[$1]}"
  [ -e "$src" ] || git clone --quiet "${URL[$1]}" "$src"
  mkdir -p "$2" && git -C "$src" archive "${COMMIT[$1]}" | tar -x -C "$2"
}

compared() {  # compared LABEL LOG: the compared lines, without timestamps or timings
  grep -E "${COMPARED[$1]}" "$2" | sed -E \
    -e 's/^[0-9-]+ [0-9:,]+ \| //' \
    -e 's/^\[[0-9/]+ [0-9:]+\] - ([0-9]+)[[:space:]]+[0-9.]+[[:space:]]+[0-9.]+/\1/' \
    -e 's/Batch: [0-9.]+s//'
}

loss_values() {  # loss_values LABEL LOG: "where<TAB>loss" for every printed training loss
  case "$1" in
    ro-*|awp-at)  # per epoch: the training robust loss (the objective, with the term)
      grep -E "$EPOCH_LINE" "$2" | awk '{ printf "epoch %d\t%s\n", $4 + 1, $10 }' ;;
    awp-trades)  # per step: the running mean of the loss (its first step is that step's loss)
      awk '/^epoch: / { epoch = $2 } /Total:-\|/ {
             match($0, /\([0-9]+\/[0-9]+\)/); where = substr($0, RSTART, RLENGTH)
             match($0, /Loss:[0-9.]+/); printf "%d %s\t%s\n", epoch, where, substr($0, RSTART + 5, RLENGTH - 5)
           }' "$2" ;;
    *)
      grep -E 'Loss: ' "$2" | sed -E 's/^[0-9-]+ [0-9:,]+ \| //' | awk '
        /Epoch: / { match($0, /Epoch: [0-9]+ \[[0-9]+/); where = substr($0, RSTART + 7, RLENGTH - 7) "]" }
        !/Epoch: / { epochs += 1; where = "epoch " epochs }
        { match($0, /Loss: [0-9.]*[0-9]/); printf "%s\t%s\n", where, substr($0, RSTART + 6, RLENGTH - 6) }' ;;
  esac
}

by_epoch() {  # by_epoch EPOCH FILE: the loss lines of one epoch
  awk -F'\t' -v e="$1" '{ split($1, w, " "); n = (w[1] == "epoch") ? w[2] : w[1]; if (n == e) print }' "$2"
}

hat_flags=(--pandas-append --stub robustness.datasets --stub autoattack.autopgd_base)

# run_LABEL CHECKOUT LOG OUT [FLAGS...]; $STANDIN holds extra stand-ins (--cuda-to-cpu).
run_trades() {
  local dir=$1 log=$2 out=$3; shift 3
  (cd "$dir" && $RUN --tiny-model trades $STANDIN train_trades_cifar10.py --epochs 2 \
     --batch-size 32 --test-batch-size 100 --log-interval 1 --model-dir "$out" "$@" >"$log" 2>&1)
}
run_mart() {
  local dir=$1 log=$2 out=$3; shift 3
  (cd "$dir" && $RUN --tiny-model mart $STANDIN train_wideresnet.py --epochs 2 \
     --batch-size 32 --test-batch-size 100 --log-interval 1 --model "$out" "$@" >"$log" 2>&1)
}
run_mart-resnet() {
  local dir=$1 log=$2 out=$3; shift 3
  (cd "$dir" && $RUN --tiny-model mart $STANDIN train_resnet.py --epochs 2 \
     --batch-size 32 --test-batch-size 100 --log-interval 1 --model "$out" "$@" >"$log" 2>&1)
}
run_st() {  # ST-AT accepts only 80 or 120 epochs (they select its schedule): stop after two
  local dir=$1 log=$2 out=$3; shift 3
  ln -sfn ../data "$dir/data"
  (cd "$dir" && $RUN --tiny-model st $STANDIN --stop-after-epochs 2 train_stat.py --epochs 80 \
     --batch-size 32 --test-batch-size 100 --log-interval 1 --beta 6 --num_workers 0 \
     --model-dir "$out" "$@" >"$log" 2>&1)
}
run_hat() {  # HAT needs a standard-trained helper model: one epoch, unpatched, shared by all runs
  local dir=$1 log=$2 out=$3; shift 3
  mkdir -p "$out" && cp -r "$WORK/runs/hat-helper/helper" "$out/"
  (cd "$dir" && PYTHONPATH="${PYTHONPATH:-}:${EXTRA_PYTHONPATH:-}" $RUN --tiny-model hat \
     "${hat_flags[@]}" $STANDIN train.py --data-dir "$WORK/runs/hatdata" --log-dir "$out" \
     --tmp-dir "$WORK/runs/hattmp" --data cifar10 -m resnet18 --batch-size 32 \
     --batch-size-validation 100 --num-samples-eval 50 --seed 1 --desc hat -na 2 \
     --helper-model helper --beta 2.5 --gamma 0.5 --h 2 "$@" >"$log" 2>&1)
  cp "$out/hat/stats_adv.csv" "${log%.txt}.csv"
}
run_hat-wa() {  # train-wa.py with weight averaging (--tau), the same helper model
  local dir=$1 log=$2 out=$3; shift 3
  mkdir -p "$out" && cp -r "$WORK/runs/hat-helper/helper" "$out/"
  (cd "$dir" && PYTHONPATH="${PYTHONPATH:-}:${EXTRA_PYTHONPATH:-}" $RUN --tiny-model hat \
     "${hat_flags[@]}" $STANDIN train-wa.py --data-dir "$WORK/runs/hatdata-wa" --log-dir "$out" \
     --tmp-dir "$WORK/runs/hattmp" --data cifar10 -m resnet18 --batch-size 32 \
     --batch-size-validation 100 --seed 1 --desc hat -na 2 --helper-model helper --beta 2.5 \
     --gamma 0.5 --h 2 --tau 0.995 "$@" >"$log" 2>&1)
  cp "$out/hat/stats_adv.csv" "${log%.txt}.csv"
}
run_ro() {  # run_ro SCRIPT DATA CHECKOUT LOG OUT [FLAGS...]
  local script=$1 data=$2 dir=$3 log=$4 out=$5; shift 5
  (cd "$dir" && $RUN --tiny-model preact $STANDIN "$script" --data-dir "$data" --epochs 2 \
     --batch-size 32 --attack-iters 5 --fname "$out" "$@" >"$log" 2>&1)
}
run_ro-cifar10() { run_ro train_cifar.py "$WORK/runs/data" "$@"; }
run_ro-svhn() { run_ro train_svhn.py "$WORK/runs/svhn" "$@"; }
run_ro-cifar100() { run_ro train_cifar100.py "$WORK/runs/data100" "$@"; }
run_awp-at() {  # AWP perturbs the weights from the first epoch on (--awp-warmup 0, the default)
  local dir=$1 log=$2 out=$3; shift 3
  (cd "$dir/AT_AWP" && $RUN --tiny-model preact $STANDIN train_cifar10.py \
     --data-dir "$WORK/runs/data" --epochs 2 --batch-size 32 --batch-size-test 100 \
     --attack-iters 5 --attack-iters-test 5 --fname "$out" "$@" >"$log" 2>&1)
}
run_awp-trades() {  # its default --awp-warmup is 10: 0 perturbs the weights from epoch 1 on
  local dir=$1 log=$2 out=$3; shift 3
  (cd "$dir/trades_AWP" && $RUN --tiny-model awp-trades --progress-bar --accuracy-reshape \
     $STANDIN train_trades_cifar.py --data-path "$WORK/runs/data" --epochs 2 --batch-size 32 \
     --test-batch-size 100 --num-steps 5 --awp-warmup 0 --model-dir "$out" "$@" >"$log" 2>&1)
  cp "$out/log.txt" "${log%.txt}.csv"
}

summary="$WORK/logs/SUMMARY.txt"; : >"$summary"
declare -A ROUNDTRIP=()
for label in ${ONLY:-${RUNS[@]}}; do
  name=${PATCH[$label]}
  pristine="$WORK/runs/pristine-$name"; patched="$WORK/runs/patched-$name"
  unpatched="$WORK/runs/unpatched-$name"
  if [ -z "${ROUNDTRIP[$name]:-}" ]; then
    extract "$name" "$pristine"
    # Patch round trip on a scratch copy: apply, apply again (no-op), revert, compare bytes.
    trip="$WORK/runs/roundtrip-$name"; cp -r "$pristine" "$trip"
    for args in "" "" "--revert"; do
      "$PYTHON" -m memloss_addon.experiments.patching "$name" "$trip" $args \
        >>"$WORK/logs/patch-$name.txt"
    done
    diff -r "$pristine" "$trip" >/dev/null && ROUNDTRIP[$name]=exact || ROUNDTRIP[$name]=DIFFERENT
    cp -r "$pristine" "$unpatched"; cp -r "$pristine" "$patched"
    "$PYTHON" -m memloss_addon.experiments.patching "$name" "$patched" \
      >>"$WORK/logs/patch-$name.txt"
  fi
  # Upstream lines changed on this script's path: counted in the actual diff, over the files the
  # patch lists for the script.
  files=$("$PYTHON" -c "import sys; from memloss_addon.integrations.specs import PATCHES as P
p = P[sys.argv[1]]; print(' '.join(p.scripts.get(sys.argv[2], p.edited_files)))" "$name" "${SCRIPT[$label]}")
  changed=0
  for file in $files; do
    n=$(git diff --no-index --numstat "$pristine/$file" "$patched/$file" | awk '{print $1 + $2}' || true)
    changed=$((changed + ${n:-0}))
  done
  total=$( (cd "$WORK/runs" && git diff --no-index --numstat "pristine-$name" "patched-$name" \
    || true) | grep -v -E 'memloss_shim.py|\.memloss-patch.json' | awk '{s += $1 + $2} END {print s}')

  if [[ $label == hat* ]] && [ ! -e "$WORK/runs/hat-helper/helper" ]; then
    # the helper model, trained once by the unpatched code
    helper="$WORK/runs/hat-helper"; mkdir -p "$helper"
    (cd "$unpatched" && PYTHONPATH="${PYTHONPATH:-}:${EXTRA_PYTHONPATH:-}" $RUN --tiny-model hat \
       "${hat_flags[@]}" --cuda-to-cpu train.py --data-dir "$WORK/runs/hatdata" \
       --log-dir "$helper" --tmp-dir "$WORK/runs/hattmp" --data cifar10 -m resnet18 \
       --batch-size 32 --batch-size-validation 100 --num-samples-eval 50 --seed 1 --desc helper \
       -ns 1 >"$WORK/logs/hat-helper.txt" 2>&1)
  fi

  logs="$WORK/logs/$label"; out="$WORK/runs/out/$label"
  STANDIN=--cuda-to-cpu "run_$label" "$unpatched" "$logs-unpatched.txt" "$out-unpatched"
  STANDIN= "run_$label" "$patched" "$logs-beta0.txt" "$out-beta0" --beta-prime 0
  STANDIN= "run_$label" "$patched" "$logs-beta2.txt" "$out-beta2" --beta-prime 2
  STANDIN= "run_$label" "$patched" "$logs-init.txt" "$out-init" --beta-prime 0 --mem-attack-init

  if diff <(compared "$label" "$logs-unpatched.txt") <(compared "$label" "$logs-beta0.txt") \
    >/dev/null; then same=identical; else same=DIFFERENT; fi
  if [ -e "$logs-unpatched.csv" ] && ! cmp -s "$logs-unpatched.csv" "$logs-beta0.csv"; then
    same="$same (per-epoch csv DIFFERENT)"; fi
  weights=$("$PYTHON" "$HERE/compare_checkpoints.py" "$out-unpatched/${CHECKPOINT[$label]}" \
    "$out-beta0/${CHECKPOINT[$label]}")
  for variant in unpatched beta0 beta2 init; do loss_values "$label" "$logs-$variant.txt" >"$logs-$variant.loss"; done
  cmp -s <(by_epoch 1 "$logs-unpatched.loss") <(by_epoch 1 "$logs-beta2.loss") \
    && beta2_1=unchanged || beta2_1=CHANGED
  cmp -s <(by_epoch 2 "$logs-unpatched.loss") <(by_epoch 2 "$logs-beta2.loss") \
    && beta2_2=UNCHANGED || beta2_2=different
  cmp -s <(by_epoch 1 "$logs-unpatched.loss") <(by_epoch 1 "$logs-init.loss") \
    && init_1=unchanged || init_1=CHANGED
  cmp -s <(by_epoch 2 "$logs-unpatched.loss") <(by_epoch 2 "$logs-init.loss") \
    && init_2=UNCHANGED || init_2=different
  {
    echo "== $label: $name ${SCRIPT[$label]} (${COMMIT[$name]:0:12}): $changed upstream lines" \
      "changed on its path ($total in the patch); round trip ${ROUNDTRIP[$name]}"
    echo "   beta'=0 vs unpatched: $same; final weights $weights"
    echo "   beta'=2: epoch 1 $beta2_1, epoch 2 $beta2_2;" \
      "beta'=0 --mem-attack-init: epoch 1 $init_1, epoch 2 $init_2"
    paste "$logs-unpatched.loss" "$logs-beta0.loss" "$logs-beta2.loss" "$logs-init.loss" \
      | awk -F'\t' '{printf "   %-16s unpatched %s  beta0 %s  beta2 %s  init %s\n", $1, $2, $4, $6, $8}'
  } | tee -a "$summary"
done

# Options of robust_overfitting's train_cifar.py: each, unpatched and patched at --beta-prime 0
# (compared as above), and patched at --beta-prime 2 (must run: its exit status is reported).
if [[ " ${ONLY:-${RUNS[*]}} " == *" ro-cifar10 "* ]]; then
  echo "== robust-overfitting train_cifar.py options (beta'=0 vs unpatched; beta'=2 exit status)" \
    | tee -a "$summary"
  unpatched="$WORK/runs/unpatched-robust-overfitting"
  patched="$WORK/runs/patched-robust-overfitting"
  options=("--attack fgsm" "--attack fgsm --fgsm-init zero" "--norm l_2 --epsilon 128 --pgd-alpha 15"
    "--cutout --cutout-len 8" "--l1 5e-6" "--l2 5e-4" "--half" "--restarts 2"
    "--lr-schedule cosine" "--mixup --mixup-alpha 1.0" "--attack none" "--attack free")
  for option in "${options[@]}"; do
    tag=$(echo "$option" | tr -c 'a-z0-9\n' '_'); logs="$WORK/logs/option$tag"
    out="$WORK/runs/out/option$tag"
    # shellcheck disable=SC2086  # the option's words are separate arguments
    STANDIN=--cuda-to-cpu run_ro-cifar10 "$unpatched" "$logs-unpatched.txt" "$out-unpatched" $option
    # shellcheck disable=SC2086
    STANDIN= run_ro-cifar10 "$patched" "$logs-beta0.txt" "$out-beta0" --beta-prime 0 $option
    if diff <(compared ro-cifar10 "$logs-unpatched.txt") <(compared ro-cifar10 "$logs-beta0.txt") \
      >/dev/null; then same=identical; else same=DIFFERENT; fi
    last=$(cd "$out-unpatched" && ls model_*.pth | sort -t_ -k2 -n | tail -n 1)
    same="$same, weights $("$PYTHON" "$HERE/compare_checkpoints.py" "$out-unpatched/$last" \
      "$out-beta0/$last")"
    # shellcheck disable=SC2086
    if STANDIN= run_ro-cifar10 "$patched" "$logs-beta2.txt" "$out-beta2" --beta-prime 2 $option
    then beta2="runs"; else beta2="exit $? ($(grep -o 'memloss: .* is not supported' \
      "$logs-beta2.txt" || tail -n 1 "$logs-beta2.txt"))"; fi
    printf '   %-42s beta0 %s; beta2 %s\n' "$option" "$same" "$beta2" | tee -a "$summary"
  done
fi
echo "logs: $WORK/logs"
