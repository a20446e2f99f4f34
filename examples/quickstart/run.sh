#!/usr/bin/env bash
# The skillbank quickstart: a toy policy learns three skills one after another, each folded in
# with a RETAIN merge, on the embedded SQLite bank. Runs in about a minute on 2 CPU cores.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-$here/../../out/quickstart}"
rm -rf "$work" && mkdir -p "$work" && cd "$work"
export SKILLBANK_BANK="$work/.skillbank"
py() { python "$here/$1" "${@:2}"; }
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

echo "== pretraining a toy generalist (tasks 0-4)"
py make_checkpoints.py --stage base --out "$work"
say skillbank init --base base/model.safetensors

echo "== skill 1: finetune from HEAD on 32 demos, merge with alpha 0.8"
skillbank checkout main --out parent >/dev/null
py make_checkpoints.py --stage finetune --skill stack-cups --parent parent/model.safetensors --out "$work"
say skillbank add-skill stack-cups --finetuned ft/stack-cups/model.safetensors --alpha 0.8

echo "== skill 2: per-group alphas"
skillbank checkout main --out parent >/dev/null
py make_checkpoints.py --stage finetune --skill wipe-board --parent parent/model.safetensors --out "$work"
say skillbank add-skill wipe-board --finetuned ft/wipe-board/model.safetensors --alpha vision=1,language=0.7,action=1
say skillbank log

echo "== rebuild v1 twice: bit-identical"
say skillbank checkout v1 --out deploy/v1
cp deploy/v1/model.safetensors v1-first.safetensors
skillbank checkout v1 --out deploy/v1 >/dev/null
cmp v1-first.safetensors deploy/v1/model.safetensors && echo "deploy/v1/model.safetensors: identical bytes on rebuild"

echo "== branch an experiment from v1 and add a third skill there"
say skillbank branch experiment v1
say skillbank checkout experiment --out parent
py make_checkpoints.py --stage finetune --skill open-drawer --parent parent/model.safetensors --out "$work"
say skillbank add-skill open-drawer --finetuned ft/open-drawer/model.safetensors --alpha 0.9
say skillbank rollback v1 --branch main
say skillbank branch
say skillbank log experiment --json
say skillbank fsck

echo "== what each checkpoint knows"
skillbank checkout v2 --out deploy/v2 >/dev/null
skillbank checkout v3 --out deploy/v3 >/dev/null
py evaluate.py base/model.safetensors ft/stack-cups/model.safetensors deploy/v1/model.safetensors \
  ft/wipe-board/model.safetensors deploy/v2/model.safetensors deploy/v3/model.safetensors
