"""A worker that sleeps, reporting progress each second, then returns a small PNG it made.

    python sdk/python/examples/sleepy_worker.py --url ws://127.0.0.1:8080/v1/workers/connect \
        --state-dir ./sleepy-state --task-type sleepy [--sleep-s 1] [--token TOKEN]

Submit work with: curl -X POST localhost:8080/v1/tasks -H 'content-type: application/json'
-d '{"task_type":"sleepy","input":{}}'. The task's output is {"files":[{"id": ...}]}.
"""

import argparse
import hashlib
import logging
import struct
import time
import zlib

from kiln_worker import Task, Worker


def png(width: int, height: int, rgb: bytes) -> bytes:
    """A solid-colour PNG written with the standard library only."""
    raw = b"".join(b"\x00" + rgb * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="the gateway's worker endpoint (ws://.../v1/workers/connect)")
    ap.add_argument("--state-dir", required=True, help="worker id and result outbox live here")
    ap.add_argument("--task-type", required=True, help="the task type to serve")
    ap.add_argument("--sleep-s", type=float, default=1.0, help="seconds each task takes (default 1)")
    ap.add_argument("--token", default=None, help="worker token, if the gateway requires one")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    w = Worker(args.url, token=args.token, state_dir=args.state_dir)

    @w.handler(args.task_type)
    def sleepy(task: Task) -> dict:
        total = max(1, int(round(args.sleep_s)))
        end = time.monotonic() + args.sleep_s
        with task.stage("sleep"):
            for step in range(total):
                task.progress(step, total, stage="sleeping")
                task.sleep(min(1.0, max(0.0, end - time.monotonic())))  # raises on cancel
            task.progress(total, total, stage="sleeping")
        with task.stage("upload"):
            colour = hashlib.sha256(task.id.encode()).digest()[:3]
            f = task.upload(png(16, 16, colour), "image/png")
        return task.files(f)

    w.run()


if __name__ == "__main__":
    main()
