#!/usr/bin/env bash
# Runs the kiln-upload benchmark against nginx over TLS + HTTP/2 on 127.0.0.1. By default
# (MODE=rtt) every row goes through examples/latency_proxy at RTT_MS (20) in front of nginx:
#   rtt_faulty_pooled   faulty nginx (keepalive_requests 5, keepalive_timeout 300ms), pooled
#   rtt_nofault_pooled  no-fault nginx (defaults), pooled
#   rtt_faulty_fresh    faulty nginx, a fresh connection per upload
# MODE=loopback runs the earlier loopback rows (faulty_pooled, nofault_pooled, faulty_fresh,
# faulty_pooled_rotate5) without the proxy; MODE=all runs both (PREREAD: see below). nginx and the proxies run in
# the foreground with their own files under a temp dir and are stopped by pid (the proxies
# first by closing their standard input, so that they print their counters).
# Usage (from the workspace root):
#   bash crates/upload/bench/nginx-bench.sh [REQUESTS] [CONCURRENCY] [SIZE] [RTT_MS]
set -euo pipefail
cd "$(dirname "$0")/../../.."
REQ=${1:-10000}
CONC=${2:-16}
SIZE=${3:-200000}
RTT_MS=${4:-20}
MODE=${MODE:-rtt}
# nginx's http2_body_preread_size is its initial HTTP/2 stream window (64k when unset). The
# bench sets 256k, as an upload server does, so that one 200 KB body fits the window and a
# pooled upload needs one round trip, not two (docs/BENCHMARKS.md). PREREAD=64k gives nginx's
# default; PREREAD= (empty) leaves the directive out.
PREREAD=${PREREAD-256k}
# ROWS="rtt_faulty_pooled rtt_nofault_pooled" runs only the rows named (default: every row of MODE).
ROWS=${ROWS:-}
NGINX=${NGINX:-/usr/sbin/nginx}
dir=$(mktemp -d)
pid=""
ppids=""
cleanup() {
  exec 7>&- 2>/dev/null || true
  for p in $ppids; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true
  done
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT

# A throwaway CA and a leaf for IP:127.0.0.1 (rustls rejects a CA used as a server cert).
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=kiln bench CA" \
  -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$dir/key.pem" -out "$dir/leaf.csr" 2>/dev/null
printf "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n" > "$dir/ext.cnf"
openssl x509 -req -in "$dir/leaf.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 2 -extfile "$dir/ext.cnf" -out "$dir/cert.pem" 2>/dev/null

port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
FAULT=$(port); CLEAN=$(port); BACK=$(port)
cat > "$dir/nginx.conf" <<CONF
daemon off;
master_process off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/body; proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fcgi; uwsgi_temp_path $dir/uwsgi; scgi_temp_path $dir/scgi;
  client_body_buffer_size 1m; client_max_body_size 64m;
  ${PREREAD:+http2_body_preread_size $PREREAD;}
  ssl_certificate $dir/cert.pem; ssl_certificate_key $dir/key.pem;
  # The backend answers after nginx has read the whole upload body.
  server { listen 127.0.0.1:$BACK; keepalive_requests 1000000;
    location / { default_type application/json; return 200 '{"url":"https://img.example/x"}'; } }
  # Faulty front: GOAWAY after 5 requests per connection, idle close after 300 ms.
  server { listen 127.0.0.1:$FAULT ssl http2; keepalive_requests 5; keepalive_timeout 300ms;
    location / { proxy_pass http://127.0.0.1:$BACK; } }
  # No-fault front: nginx defaults (keepalive_requests 1000, keepalive_timeout 75s).
  server { listen 127.0.0.1:$CLEAN ssl http2;
    location / { proxy_pass http://127.0.0.1:$BACK; } }
}
CONF
"$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" &
pid=$!
for p in $FAULT $CLEAN $BACK; do
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.05; done
done
echo "nginx pid $pid: faulty https://127.0.0.1:$FAULT, no-fault https://127.0.0.1:$CLEAN" >&2
echo "--- nginx config ---" >&2; sed -n '/Faulty front/,/^}/p' "$dir/nginx.conf" >&2
echo "http2_body_preread_size: ${PREREAD:-nginx default (64k)}" >&2

cargo build --release --example upload_bench --example latency_proxy >&2
bench() { target/release/examples/upload_bench --ca "$dir/ca.pem" --method POST \
  --requests "$REQ" --concurrency "$CONC" --size "$SIZE" "$@" | tail -n1; }
row() { local name=$1; shift
  if [ -n "$ROWS" ] && [[ " $ROWS " != *" $name "* ]]; then return 0; fi
  echo "load before $name: $(uptime)" >&2
  echo "$name $(bench "$@")"; echo "load after $name: $(uptime)" >&2; }

if [ "$MODE" = rtt ] || [ "$MODE" = all ]; then
  PFAULT=$(port); PCLEAN=$(port)
  mkfifo "$dir/proxy.in"
  for pair in "$PFAULT:$FAULT" "$PCLEAN:$CLEAN"; do
    target/release/examples/latency_proxy --listen "127.0.0.1:${pair%%:*}" \
      --upstream "127.0.0.1:${pair##*:}" --rtt-ms "$RTT_MS" \
      < "$dir/proxy.in" > "$dir/proxy-${pair%%:*}.json" &
    ppids="$ppids $!"
  done
  exec 7> "$dir/proxy.in"   # the proxies run until this is closed
  for p in $PFAULT $PCLEAN; do
    for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.05; done
  done
  echo "latency proxies (rtt ${RTT_MS} ms): faulty via $PFAULT, no-fault via $PCLEAN" >&2
  row rtt_faulty_pooled  --url "https://127.0.0.1:$PFAULT/upload" --policy pooled
  row rtt_nofault_pooled --url "https://127.0.0.1:$PCLEAN/upload" --policy pooled
  row rtt_faulty_fresh   --url "https://127.0.0.1:$PFAULT/upload" --policy fresh
  exec 7>&-
  for p in $ppids; do wait "$p" 2>/dev/null || true; done
  ppids=""
  echo "proxy_faulty  $(cat "$dir/proxy-$PFAULT.json")"
  echo "proxy_nofault $(cat "$dir/proxy-$PCLEAN.json")"
fi
if [ "$MODE" = loopback ] || [ "$MODE" = all ]; then
  row faulty_pooled   --url "https://127.0.0.1:$FAULT/upload" --policy pooled
  row nofault_pooled  --url "https://127.0.0.1:$CLEAN/upload" --policy pooled
  row faulty_fresh    --url "https://127.0.0.1:$FAULT/upload" --policy fresh
  row faulty_pooled_rotate5 --url "https://127.0.0.1:$FAULT/upload" --policy pooled --max-requests-per-connection 5
fi
