"""The worker the scenario tests run as a real process: one handler per behaviour under test.
Every handler appends JSON lines ({"event", "task", "attempt", "t"}) to --log."""

import argparse
import asyncio
import json
import logging
import struct
import threading
import time
import zlib

from kiln_worker import Cancelled, Task, Worker


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--slots", type=int, default=1)
    ap.add_argument("--grace-s", type=float, default=30.0)
    ap.add_argument("--max-incoming-frame-bytes", type=int, default=16 << 20)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    lock = threading.Lock()

    def note(event: str, task: Task, **extra) -> None:
        line = json.dumps({"event": event, "task": task.id, "attempt": task.attempt, "t": time.time(), **extra})
        with lock, open(args.log, "a") as f:
            f.write(line + "\n")
            f.flush()

    w = Worker(
        args.url,
        state_dir=args.state_dir,
        slots=args.slots,
        shutdown_grace_s=args.grace_s,
        reconnect_base_s=0.2,
        reconnect_cap_s=1.0,
        max_incoming_frame_bytes=args.max_incoming_frame_bytes,
    )
    w.gpu_stats(lambda: {"util": 12.5, "mem_used_mb": 100, "mem_total_mb": 1000})

    @w.handler("t_sleep")
    def t_sleep(task: Task) -> dict:
        note("start", task)
        s = float(task.input.get("sleep_s", 0.1))
        end = time.monotonic() + s
        with task.stage("sleep"):
            while time.monotonic() < end:
                task.progress(int(s - (end - time.monotonic())), int(s) or 1)
                task.sleep(min(0.2, max(0.0, end - time.monotonic())))
        note("done", task)
        return {"task": task.id, "attempt": task.attempt}

    @w.handler("t_fail")
    def t_fail(task: Task) -> dict:
        note("start", task)
        raise RuntimeError(task.input["message"])

    @w.handler("t_big")
    def t_big(task: Task) -> dict:
        note("start", task)
        return {"blob": "x" * int(task.input["bytes"])}

    @w.handler("t_cancel")
    def t_cancel(task: Task) -> dict:
        note("start", task)
        try:
            for _ in range(3000):
                task.check_cancelled()
                time.sleep(0.01)  # a step of work
        except Cancelled:
            note("cancel_seen", task)
            raise
        return {"finished": True}

    @w.handler("t_async")
    async def t_async(task: Task) -> dict:
        note("start", task)
        try:
            await asyncio.sleep(float(task.input.get("sleep_s", 30)))
        except asyncio.CancelledError:
            note("cancel_seen", task)
            raise
        return {"slept": True}

    @w.handler("t_upload")
    def t_upload(task: Task) -> dict:
        note("start", task)
        with task.stage("upload"):
            f = task.upload(task.input["path"], task.input["mime"])
        return task.files(f)

    def solid_png(rgb, size=8) -> bytes:
        raw = b"".join(b"\x00" + bytes(rgb) * size for _ in range(size))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")

    @w.handler("t_preview")
    def t_preview(task: Task) -> dict:
        note("start", task)
        for i in range(int(task.input.get("count", 3))):
            img = solid_png((40 * i, 100, 200), size=8 + i)
            if task.input.get("by_file"):
                task.preview_file(task.upload(img, "image/png")["id"], "image/png")
            else:
                task.preview(img, "image/png")
            note("preview", task, index=i)
            task.sleep(float(task.input.get("gap_s", 0.3)))
        task.sleep(float(task.input.get("hold_s", 0)))
        return {"previews": int(task.input.get("count", 3))}

    @w.handler("t_flood")
    def t_flood(task: Task) -> dict:
        note("start", task)
        task.sleep(float(task.input.get("wait_s", 0)))
        png = solid_png((250, 120, 0))
        started = time.monotonic()
        for _ in range(int(task.input["count"])):
            task.preview(png, "image/png")
        note("flooded", task, took_s=time.monotonic() - started)
        return {"flooded": int(task.input["count"])}

    w.run()


if __name__ == "__main__":
    main()
