#!/usr/bin/env bash
# Writes integrations/<name>/memloss.patch: the changes `memloss patch <name>` makes, as a
# zero-context unified diff (our lines, the replaced upstream lines, no other upstream text).
# Usage: render_patches.sh PRISTINE_ROOT, where PRISTINE_ROOT/pristine-<name> holds each pinned
# commit (verify_all.sh leaves them in $WORK/runs).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
for name in trades mart hat st robust-overfitting awp; do
  scratch="$(mktemp -d)"
  cp -r "$1/pristine-$name/." "$scratch"
  git -C "$scratch" init --quiet
  git -C "$scratch" add -A
  git -C "$scratch" -c user.name=render -c user.email=render@localhost commit --quiet -m pristine
  "$PYTHON" -m memloss_addon.experiments.patching "$name" "$scratch" >/dev/null
  git -C "$scratch" ls-files --others --exclude-standard -- ':!.memloss-patch.json' \
    | xargs git -C "$scratch" add -N --
  git -C "$scratch" diff -U0 -- . ':!.memloss-patch.json' \
    | sed -E 's/^(@@ [^@]+ @@).*/\1/' >"$HERE/../$name/memloss.patch"
  rm -rf "$scratch"
done
