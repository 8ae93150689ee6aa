#!/usr/bin/env python3
"""A webhook receiver for kiln's end-to-end tests.

Verifies every delivery with the official Standard Webhooks library (`standardwebhooks`,
installed into the test venv by scripts/prepare.sh) and appends one JSON line per request to
--out:

    {"webhook_id": ..., "type": ..., "timestamp": ..., "verified": true|false,
     "error": null|"...", "received_at": <unix seconds, float>, "status": <status answered>}

Listens on 127.0.0.1:--port (0 picks a free port); the first line on stdout is
"listening <port>". Answers 204 to a verified delivery and 400 to one that does not verify,
unless a switch says otherwise:

    --fail-503-for S   answer 503 (with --retry-after, if given) for the first S seconds
    --always-410       answer 410 Gone
    --redirect-302     answer 302 to --redirect-to
    --never-answer     read the request and never answer (the sender must time out)

Every request is recorded, whatever the answer. Stops on SIGTERM or SIGINT.
"""

import argparse
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--secret", required=True, action="append",
                   help="whsec_... secret; repeat to accept any of several")
    p.add_argument("--out", required=True, help="JSON-lines file the deliveries are appended to")
    p.add_argument("--fail-503-for", type=float, default=0.0, metavar="S")
    p.add_argument("--retry-after", default=None, help="Retry-After value sent with a 503")
    p.add_argument("--always-410", action="store_true")
    p.add_argument("--redirect-302", action="store_true")
    p.add_argument("--redirect-to", default="http://127.0.0.1:9/elsewhere")
    p.add_argument("--never-answer", action="store_true")
    return p.parse_args()


def main():
    args = parse_args()
    hooks = [Webhook(s) for s in args.secret]
    started = time.monotonic()
    lock = threading.Lock()
    out = open(args.out, "a", encoding="utf-8")

    def record(entry):
        with lock:
            out.write(json.dumps(entry) + "\n")
            out.flush()

    def verify(body, headers):
        error = None
        for hook in hooks:
            try:
                hook.verify(body, headers)
                return True, None
            except Exception as e:  # WebhookVerificationError, or a malformed header
                error = f"{type(e).__name__}: {e}"
        return False, error

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):
            pass

        def do_POST(self):
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            verified, error = verify(body, headers)
            try:
                kind = json.loads(body).get("type")
            except Exception:
                kind = None
            if args.never_answer:
                status = None
            elif args.always_410:
                status = 410
            elif args.redirect_302:
                status = 302
            elif time.monotonic() - started < args.fail_503_for:
                status = 503
            else:
                status = 204 if verified else 400
            record({
                "webhook_id": headers.get("webhook-id"),
                "type": kind,
                "timestamp": headers.get("webhook-timestamp"),
                "verified": verified,
                "error": error,
                "received_at": time.time(),
                "status": status,
            })
            if status is None:
                time.sleep(3600)
                return
            self.send_response(status)
            if status == 302:
                self.send_header("location", args.redirect_to)
            if status == 503 and args.retry_after is not None:
                self.send_header("retry-after", args.retry_after)
            reply = b"" if status == 204 else (error or "").encode()[:200]
            if status != 204:
                self.send_header("content-type", "text/plain; charset=utf-8")
                self.send_header("content-length", str(len(reply)))
            self.end_headers()
            if status != 204:
                self.wfile.write(reply)

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"listening {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
