#!/usr/bin/env bash
# The deployment walkthrough of docs/walkthrough.md, run for real on one machine (loopback): a coordinator and
# three hospitals, each hospital's kit made by `tba-fed site init` with its own key pair, TLS, node
# authentication, the real DINOv2-S and real images (Fashion-MNIST from Debian, written as PNG folders, standing
# in for each hospital's own). Every command is run as shown and its output written to TRANSCRIPT (markdown).
#   scripts/walkthrough.sh WORKDIR TRANSCRIPT     e.g. scripts/walkthrough.sh /tmp/walkthrough walkthrough.md
# WORKDIR must not exist (nothing of yours is touched); Flower's configuration goes to WORKDIR/flwr, not ~/.flwr.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:?usage: walkthrough.sh WORKDIR TRANSCRIPT}
transcript=${2:?usage: walkthrough.sh WORKDIR TRANSCRIPT}
[[ ! -e "$work" ]] || { echo "walkthrough.sh: $work exists; give a new directory" >&2; exit 2; }
[[ ! -e "$transcript" ]] || { echo "walkthrough.sh: $transcript exists; give a new file" >&2; exit 2; }
venv=$(cd "${TBA_FED_VENV:-.venv}" && pwd)  # make setup made it
export PATH="$venv/bin:$PATH" FLWR_HOME="$work/flwr"
port=${WALKTHROUGH_PORT:-9092}
mkdir -p "$work"/{coordinator/sites,data,flwr}
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT

say() { printf '\n%s\n' "$*" >> "$transcript"; }
# run a command as the transcript shows it; its output (stdout and stderr) and exit code follow it
show() {
  printf '\n```console\n$ %s\n' "$*" >> "$transcript"
  local code=0
  bash -c "$*" >> "$transcript" 2>&1 || code=$?
  [[ $code == 0 ]] || printf '(exit code %d)\n' "$code" >> "$transcript"
  printf '```\n' >> "$transcript"
}
# start a long-running command in the background, its log in a file
start() {
  local log=$1; shift
  printf '\n```console\n$ %s &   # log: %s\n```\n' "$*" "$log" >> "$transcript"
  bash -c "exec $*" > "$log" 2>&1 &
  pids+=($!)
}
wait_for() {  # up to $2 seconds for the command $1 to succeed
  local deadline=$((SECONDS + $2))
  until bash -c "$1" >/dev/null 2>&1; do
    (( SECONDS < deadline )) || { echo "walkthrough.sh: gave up waiting for: $1" >&2; exit 1; }
    sleep 2
  done
}

# each hospital's images: 150 Fashion-MNIST test images a site, one sub-folder per class (not part of the walkthrough)
python - "$work/data" <<'EOF'
import gzip, sys
from pathlib import Path
import numpy as np
from PIL import Image
root = Path("/usr/share/datasets/fashion-mnist")
images = np.frombuffer(gzip.open(root / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 28, 28)
labels = np.frombuffer(gzip.open(root / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
for i, site in enumerate(("hospital-a", "hospital-b", "hospital-c")):
    for j in range(i * 150, (i + 1) * 150):
        folder = Path(sys.argv[1]) / site / f"class-{labels[j]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[j]).save(folder / f"{j:05d}.png")
EOF

c="$work/coordinator"
echo "# A three-hospital deployment on one machine, as run on $(date -u +%Y-%m-%d) by scripts/walkthrough.sh" > "$transcript"
say "Working directory: \`$work\` (\`coordinator/\`, \`hospital-a/\`, \`hospital-b/\`, \`hospital-c/\` stand for four machines)."

say "## 1. Coordinator: certificates (no site key)"
show scripts/make-certificates.sh "$c/certs" 127.0.0.1

say "## 2. Each hospital: its kit, made at the hospital (the private key never leaves it)"
letter=0
for site in hospital-a hospital-b hospital-c; do
  show tba-fed site init "$work/$site" --name "$site" --superlink "127.0.0.1:$port" --ca "$c/certs/ca.crt" \
    --data "$work/data/$site" --model dinov2-s-imgfocus --model-arg img_size=112 --epsilon 4 --min-images 20 \
    --min-noise-sites 2 --port $((9200 + letter))
  letter=$((letter + 1))
  say "$site sends its public key to the coordinator (e-mail, a ticket: it is public):"
  show cp "$work/$site/keys/$site.key.pub" "$c/sites/"
done

say "## 3. Coordinator: the run's YAML, preflight, the SuperLink, the connection, status"
sed -e "s|/srv/tba-fed/sites|$c/sites|; s|/srv/tba-fed|$c|; s|superlink.example.org|127.0.0.1|; s|0.0.0.0|127.0.0.1|" \
    -e "s|port: 9092|port: $port|; s|epsilon: 1.0|epsilon: 2.0|" configs/deployment/run.yaml > "$c/run.yaml"
say "\`run.yaml\` is \`configs/deployment/run.yaml\` with this machine's paths, address and port, and ε 2 (diff exits 1 when files differ):"
show diff configs/deployment/run.yaml "$c/run.yaml"
show tba-fed preflight "$c/run.yaml"
start "$c/superlink.log" tba-fed superlink "$c/run.yaml"
wait_for "tba-fed status $c/run.yaml | grep -q 'superlink.sites.hospital-c: hospital-c: node'" 120
show tba-fed connect "$c/run.yaml"
show flwr supernode list hospitals
show tba-fed status "$c/run.yaml"

say "## 4. Each hospital: preflight, then its SuperNode"
for site in hospital-a hospital-b hospital-c; do
  show tba-fed preflight "$work/$site/site.yaml"
  start "$work/$site/supernode.log" tba-fed supernode "$work/$site/site.yaml"
done
wait_for "tba-fed status $c/run.yaml | grep -q '3 of 3 listed sites connected'" 180

say "## 5. Coordinator: status, the run, status again"
show tba-fed status "$c/run.yaml"
show tba-fed submit "$c/run.yaml"
show tba-fed status "$c/run.yaml"
show "ls $c/server-out"
show cat "$c/server-out/report.md"

say "## 6. A hospital: what it released, and its audit log against the server's"
show tba-fed status "$work/hospital-a/site.yaml"
show tba-fed privacy report "$work/hospital-a/site.yaml"
show tba-fed audit verify "$work/hospital-a/out/audit.jsonl" --against "$c/server-out.audit.jsonl"
show "ls $work/hospital-a/out/compressed"
echo "walkthrough.sh: transcript in $transcript"
