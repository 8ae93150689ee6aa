"""A 200 MB MP4-like output uploaded by a worker through Task.upload (streamed from a path),
downloaded byte for byte, with a Range request, while the server's and the worker's peak
memory (VmHWM) stay far below the file's size."""

import hashlib
import os
import struct
import threading
import time
import urllib.request

from conftest import wait_until

SIZE = 200 * 1000 * 1000
BOUND = 100 << 20  # growth of peak RSS allowed while 200 MB pass through


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def mp4_like(path, size):
    """An ISO-BMFF file: an ftyp box, then an mdat box of pseudo-random bytes."""
    h = hashlib.sha256()
    head = struct.pack(">I4s4sI8s", 24, b"ftyp", b"isom", 0x200, b"isomiso2")
    mdat = struct.pack(">I4s", size - len(head), b"mdat")
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for part in (head, mdat):
            f.write(part)
            h.update(part)
        left = size - len(head) - len(mdat)
        i = 0
        while left:
            chunk = block[: min(left, len(block))]
            chunk = i.to_bytes(8, "big") + chunk[8:] if len(chunk) > 8 else chunk  # no two blocks alike
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
            i += 1
    return h.hexdigest()


def test_a_200_mb_mp4_round_trips_byte_for_byte_with_bounded_memory(env):
    s = env.server
    path = os.path.join(env.root, "talking-head.mp4")
    digest = mp4_like(path, SIZE)
    w = env.worker()
    wait_until(lambda: s.call("GET", "/v1/workers")[1]["data"], 20, "the worker to connect")
    server_before = status_kb(s.proc.pid, "VmHWM") << 10
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                samples.append(status_kb(s.proc.pid, "VmRSS") << 10)
            except (OSError, KeyError):
                pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    started = time.time()
    try:
        tid = s.submit("t_upload", {"path": path, "mime": "video/mp4"})
        t = s.wait_status(tid, ("succeeded",), 120)
        upload_s = time.time() - started
        f = t["output"]["files"][0]
        assert f["content_type"] == "video/mp4" and f["bytes"] == SIZE, f
        h = hashlib.sha256()
        got = 0
        with urllib.request.urlopen(s.base + f["url"], timeout=60) as r:
            assert r.headers["Content-Type"] == "video/mp4"
            assert int(r.headers["Content-Length"]) == SIZE
            while True:
                chunk = r.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                got += len(chunk)
        assert got == SIZE and h.hexdigest() == digest
        req = urllib.request.Request(s.base + f["url"], headers={"Range": "bytes=100000000-100000099"})
        with urllib.request.urlopen(req, timeout=30) as r, open(path, "rb") as src:
            assert r.status == 206
            assert r.headers["Content-Range"] == f"bytes 100000000-100000099/{SIZE}"
            src.seek(100_000_000)
            assert r.read() == src.read(100)
    finally:
        stop.set()
        th.join()
    server_peak = status_kb(s.proc.pid, "VmHWM") << 10
    worker_peak = status_kb(w.proc.pid, "VmHWM") << 10
    print(
        f"\n200 MB upload+download: upload task {upload_s:.1f} s; server peak RSS {server_peak >> 20} MiB "
        f"(before {server_before >> 20} MiB, max sampled {max(samples) >> 20} MiB); worker peak RSS {worker_peak >> 20} MiB"
    )
    assert server_peak - server_before < BOUND, (server_before, server_peak)
    assert worker_peak < BOUND, worker_peak


def test_an_upload_over_files_max_bytes_is_refused_at_once_not_retried(tmp_path):
    from conftest import Server

    from kiln_worker import UploadError
    from kiln_worker.files import upload

    s = Server(str(tmp_path), {"KILN_FILES__MAX_BYTES": str(1 << 20)}).start()
    try:
        started = time.time()
        try:
            upload(s.ws_url, os.urandom(8 << 20), "video/mp4", deadline_s=60)
            raise AssertionError("an 8 MiB upload over a 1 MiB limit was accepted")
        except UploadError as e:
            assert e.status == 413 and not e.retryable, (e.status, str(e))
        assert time.time() - started < 10
        f = upload(s.ws_url, b"\x00\x00\x00\x18ftypisom" + os.urandom(1000), "video/mp4")
        assert f["bytes"] == 1012 and f["content_type"] == "video/mp4", f
    finally:
        s.stop()
