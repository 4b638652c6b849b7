#!/usr/bin/env bash
# A wheel install trains: build the wheel, install it (not editable) into a fresh virtualenv beside
# torch, then, from an empty folder outside the checkout, list the config groups, train
# experiment=smoke through a user's own --config-dir experiment, export the checkpoint and inspect
# with the model.  `make test` runs this (so CI does); `make wheel-check` runs it alone.
#   usage: .ci/wheel_check.sh PYTHON [TORCH_PIP_ARGS...]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${1:?usage: $0 PYTHON [TORCH_PIP_ARGS...]}"
shift
work="$(mktemp -d "${TMPDIR:-/tmp}/defectscope-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
step() { printf '\n== wheel check: %s\n' "$*"; }
trap 'echo "wheel check FAILED (line $LINENO: $BASH_COMMAND)" >&2' ERR

step "build the wheel"
# from a copy of the files git knows (tracked or not ignored): no stale build/ folder gets in, and
# the checkout gets none
git -C "$repo" ls-files -z --cached --others --exclude-standard | "$py" -c '
import os, shutil, sys
repo, dest = sys.argv[1:3]
for rel in filter(None, sys.stdin.read().split("\0")):
    if os.path.isfile(os.path.join(repo, rel)):
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(os.path.join(repo, rel), os.path.join(dest, rel))
' "$repo" "$work/src"
"$py" -m pip wheel -q --no-deps -w "$work/dist" "$work/src"
wheel="$(ls "$work"/dist/defectscope-*.whl)"
"$py" -c 'import sys, zipfile; assert "defectscope/conf/experiment/smoke.yaml" in zipfile.ZipFile(sys.argv[1]).namelist()' "$wheel"

step "install it into a fresh virtualenv, torch first"
"$py" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$@" torch==2.13.0
"$work/venv/bin/python" -m pip install -q "$wheel[train,cpu]"
ds="$work/venv/bin/defectscope"
"$work/venv/bin/python" - <<'PY'
import defectscope, pathlib
where = pathlib.Path(defectscope.__file__).parent
assert "site-packages" in where.parts, f"defectscope imported from {where}, not from the installed wheel"
print(f"defectscope {defectscope.__version__} from {where}")
PY

mkdir -p "$work/run/my-configs/experiment" && cd "$work/run"
step "train --help lists only the groups a user chooses (no _base, no model_recipe)"
"$ds" train --help > help.txt
grep -qx 'data: csv, elpv, folder, synthetic' help.txt
! grep -Eq '^(model_recipe|hydra):|_base' help.txt

step "train experiment=smoke, through a user's own experiment file (--config-dir)"
cat > my-configs/experiment/quick.yaml <<'YAML'
# @package _global_
# A user's experiment: the packaged smoke run, one epoch, no MLflow.
defaults:
  - smoke
  - override /logger: none
trainer:
  max_epochs: 1
YAML
"$ds" train --config-dir my-configs experiment=quick | tee train.txt
ckpt="$(sed -n 's/^best checkpoint: *\([^ ]*\).*/\1/p' train.txt)"
test -f "$ckpt"

step "export and inspect"
"$ds" export "$ckpt" -o model.onnx
"$ds" inspect model.onnx data/synthetic-smoke --recursive -o results.jsonl
test -s results.jsonl
echo "wheel check passed: $(wc -l < results.jsonl) rows from a model trained by the installed wheel"
