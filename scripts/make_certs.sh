#!/usr/bin/env bash
# Local certificates for trying fedsafe on Flower with TLS and SuperNode authentication.
#
#   scripts/make_certs.sh [OUT_DIR] [NUM_SUPERNODES] [SERVER_NAME ...]
#
#   OUT_DIR          where to write (default: certs)
#   NUM_SUPERNODES   how many SuperNode key pairs (default: 2)
#   SERVER_NAME ...  names/IPs the SuperLink certificate is valid for (default: 127.0.0.1 localhost);
#                    use the SuperLink machine's real host name / IP for a deployment across machines.
#
# Writes (openssl; private keys are chmod 600):
#   ca.crt, ca.key              a local certificate authority (give ca.crt to every SuperNode and flwr user)
#   server.pem, server.key      the SuperLink's TLS certificate (signed by the CA) and key
#   supernode-N, supernode-N.pub  one ECDSA P-384 key pair per SuperNode, OpenSSH format (what
#                               flower-supernode --auth-supernode-private-key and
#                               flwr supernode register expect)
# For trying things out only: a real deployment needs a properly protected CA, and each organisation
# should create its own SuperNode key pair and send only the .pub file to the SuperLink operator.
set -euo pipefail

OUT="${1:-certs}"
N="${2:-2}"
shift $(( $# > 2 ? 2 : $# ))
NAMES=("$@")
[ ${#NAMES[@]} -eq 0 ] && NAMES=(127.0.0.1 localhost)
DAYS="${CERT_DAYS:-30}"

command -v openssl >/dev/null || { echo "make_certs.sh: openssl not found" >&2; exit 1; }
case "$N" in ''|*[!0-9]*) echo "make_certs.sh: NUM_SUPERNODES must be a number, got '$N'" >&2; exit 2;; esac

mkdir -p "$OUT"
cd "$OUT"
umask 077

san=""
for n in "${NAMES[@]}"; do
  if [[ "$n" =~ ^[0-9.]+$ || "$n" == *:* ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
done
san="${san%,}"

# CA
openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$DAYS" -keyout ca.key -out ca.crt \
  -subj "/CN=fedsafe local CA" >/dev/null 2>&1
# SuperLink server certificate with subjectAltName
openssl req -newkey rsa:2048 -nodes -sha256 -keyout server.key -out server.csr -subj "/CN=${NAMES[0]}" >/dev/null 2>&1
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" \
  "$san" > server.ext
openssl x509 -req -sha256 -days "$DAYS" -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
  -out server.pem -extfile server.ext >/dev/null 2>&1
rm -f server.csr server.ext ca.srl
openssl verify -CAfile ca.crt server.pem >/dev/null

# SuperNode authentication keys: ECDSA P-384, OpenSSH format. openssl makes the key; ssh-keygen (or,
# without it, Python's `cryptography`, which Flower depends on) writes it in OpenSSH format.
py="${PYTHON:-python3}"
for ((i = 0; i < N; i++)); do
  k="supernode-$i"
  rm -f "$k" "$k.pub"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$k.pem" 2>/dev/null
  if command -v ssh-keygen >/dev/null; then
    cp "$k.pem" "$k"
    ssh-keygen -p -q -N "" -f "$k" >/dev/null            # rewrite in OpenSSH format
    ssh-keygen -y -f "$k" | sed "s/\$/ $k/" > "$k.pub"
  else
    "$py" - "$k" <<'EOF'
import sys
from cryptography.hazmat.primitives import serialization as s
k = sys.argv[1]
key = s.load_pem_private_key(open(k + ".pem", "rb").read(), None)
open(k, "wb").write(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
open(k + ".pub", "wb").write(key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH) + b" " + k.encode() + b"\n")
EOF
  fi
  rm -f "$k.pem"
  chmod 600 "$k"
  chmod 644 "$k.pub"
done
chmod 644 ca.crt server.pem

echo "wrote to $OUT: ca.crt ca.key server.pem server.key (SAN: $san) and $N SuperNode key pairs supernode-N[.pub]"
