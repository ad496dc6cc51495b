#!/usr/bin/env bash
# Certificates for a tba-fed deployment: a CA and the SuperLink's TLS certificate.
#   scripts/make-certificates.sh OUT_DIR SERVER_HOST [SITE ...]
# e.g. scripts/make-certificates.sh certs superlink.example.org
# Give the CA certificate (ca.crt) to every site; keep ca.key offline. In a deployment each site makes its own
# SuperNode key pair at the site (tba-fed site init) and sends only the public key. SITE ...: key pairs made
# here (EC P-384, OpenSSH format, as Flower requires), for tests and local trials on one machine only.
set -euo pipefail
out=${1:?usage: make-certificates.sh OUT_DIR SERVER_HOST [SITE ...]}
host=${2:?usage: make-certificates.sh OUT_DIR SERVER_HOST [SITE ...]}
shift 2
mkdir -p "$out"
cd "$out"
if [[ ! -f ca.crt ]]; then
  openssl req -x509 -newkey rsa:4096 -sha256 -days 365 -nodes -keyout ca.key -out ca.crt \
    -subj "/CN=tba-fed CA" 2>/dev/null
fi
if [[ "$host" =~ ^[0-9.]+$ ]]; then san="IP:$host"; else san="DNS:$host"; fi
openssl req -newkey rsa:4096 -nodes -keyout server.key -out server.csr -subj "/CN=$host" 2>/dev/null
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.pem -days 365 -sha256 \
  -extfile <(printf "subjectAltName=%s,DNS:localhost,IP:127.0.0.1" "$san") 2>/dev/null
rm -f server.csr
for site in "$@"; do
  [[ -f "$site.key" ]] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "$site" -f "$site.key"
done
chmod 600 ./*.key
echo "wrote $(pwd): ca.crt ca.key server.pem server.key${*:+ and keys for: $*}"
