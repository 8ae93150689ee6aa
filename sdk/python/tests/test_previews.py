"""Previews end to end: a real worker process sends them with ``task.preview``; the task's
SSE stream carries them, a client resuming with ``Last-Event-ID`` gets the latest one, the
task object links it, and a worker flooding previews is rate-limited without its result
being slowed."""

import base64
import datetime
import json
import urllib.request

import pytest

from conftest import wait_until
from kiln_worker import Worker
from kiln_worker.protocol import MAX_PREVIEW_BYTES


def sse(server, tid, last_id=None, timeout=30):
    """The events of a task's stream, as dicts ``{"id"?, "event", "data"}``, until it ends."""
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    req = urllib.request.Request(f"{server.base}/v1/tasks/{tid}/events", headers=headers)
    resp = urllib.request.urlopen(req, timeout=timeout)

    def events():
        ev = {}
        with resp:
            for raw in resp:
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if "event" in ev:
                        yield ev
                    ev = {}
                elif not line.startswith(":"):
                    k, _, v = line.partition(":")
                    v = v[1:] if v.startswith(" ") else v
                    ev[k] = json.loads(v) if k == "data" else v

    return events()


def until(events, pred):
    seen = []
    for e in events:
        seen.append(e)
        if pred(e):
            return seen
    raise AssertionError(f"the stream ended first: {[x['event'] for x in seen]}")


def test_previews_are_streamed_linked_and_the_latest_replayed_after_a_reconnect(env):
    s = env.server
    env.worker()
    tid = s.submit("t_preview", {"count": 3, "gap_s": 0.4, "hold_s": 3})
    first = until(sse(s, tid), lambda e: e["event"] == "preview")
    p0 = first[-1]
    assert p0["data"]["index"] == 0 and p0["data"]["mime"] == "image/png", p0
    assert (p0["data"]["width"], p0["data"]["height"]) == (8, 8)
    assert base64.b64decode(p0["data"]["data"])[:8] == b"\x89PNG\r\n\x1a\n"
    # Disconnected after preview 0; the worker sends 1 and 2 meanwhile.
    wait_until(lambda: (s.task(tid).get("preview") or {}).get("index") == 2, 10, "the third preview")
    t = s.task(tid)
    assert t["status"] == "running"
    assert t["preview"]["url"] == f"/v1/tasks/{tid}/preview" and t["preview"]["width"] == 10, t["preview"]
    with urllib.request.urlopen(s.base + t["preview"]["url"], timeout=10) as r:
        assert r.headers["content-type"] == "image/png" and r.headers["x-kiln-preview-index"] == "2"
        latest = r.read()
    # Resuming after preview 0: the replay holds only the latest preview (2), not 1.
    resumed = until(sse(s, tid, last_id=p0["id"]), lambda e: e["event"] in ("preview", "completed"))
    assert [e["data"]["index"] for e in resumed if e["event"] == "preview"] == [2], resumed
    assert base64.b64decode(resumed[-1]["data"]["data"]) == latest
    # Resuming after the latest preview: it is sent again first, without an id.
    again = next(sse(s, tid, last_id=resumed[-1]["id"]))
    assert again["event"] == "preview" and again["data"]["index"] == 2 and "id" not in again, again
    done = s.wait_status(tid, ("succeeded",), 30)
    assert done["preview"]["index"] == 2, "the task keeps the link to its latest preview"


def test_a_preview_uploaded_as_a_file_is_linked_by_its_file(env):
    s = env.server
    env.worker()
    tid = s.submit("t_preview", {"count": 1, "gap_s": 0, "by_file": True})
    seen = until(sse(s, tid), lambda e: e["event"] == "completed")
    p = [e["data"] for e in seen if e["event"] == "preview"]
    assert len(p) == 1 and p[0]["file_id"].startswith("file_") and "data" not in p[0], p
    assert p[0]["url"] == f"/v1/files/{p[0]['file_id']}"
    t = s.wait_status(tid, ("succeeded",), 30)
    assert t["preview"]["url"] == p[0]["url"], t["preview"]
    with urllib.request.urlopen(f"{s.base}/v1/tasks/{tid}/preview", timeout=10) as r:
        via_task = r.read()
    with urllib.request.urlopen(s.base + p[0]["url"], timeout=10) as r:
        assert r.read() == via_task and via_task[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_worker_flooding_previews_is_rate_limited_without_slowing_its_result(env):
    s = env.server
    w = env.worker()
    count = 3000
    tid = s.submit("t_flood", {"count": count, "wait_s": 1.0})
    # Follow the live stream from before the flood starts.
    events = sse(s, tid)
    seen = until(events, lambda e: e["event"] == "completed")
    t = s.wait_status(tid, ("succeeded",), 30)
    previews = [e for e in seen if e["event"] == "preview"]
    flooded = w.events("flooded", tid)[0]
    # A burst of 4, then at most one per 250 ms while the gateway read the flood.
    span_s = (previews[-1]["data"]["ts"] - previews[0]["data"]["ts"]) / 1000
    allowed = 4 + int(span_s / 0.25) + 1
    assert 4 <= len(previews) <= allowed, (len(previews), span_s, flooded)
    assert len(previews) < count / 10
    # The result was not held up: it was stored soon after the handler returned.
    completed_at = datetime.datetime.fromisoformat(t["completed_at"].replace("Z", "+00:00")).timestamp()
    lag = completed_at - flooded["t"]
    print(f"flood: {count} sent in {flooded['took_s']:.3f}s, {len(previews)} stored over {span_s:.2f}s, result {lag:.3f}s after the flood")
    assert lag < 5.0, f"the result arrived {lag:.2f}s after the flood ended"
    assert t["output"] == {"flooded": count}
    assert "preview refused" not in s.log()


def test_preview_checks_its_size_and_type(tmp_path):
    w = Worker("ws://127.0.0.1:9/v1/workers/connect", state_dir=str(tmp_path))
    from kiln_worker import protocol as p
    from kiln_worker.task import Task

    sent = []
    w._send_threadsafe = lambda m, task=None: sent.append(m)
    t = Task(w, p.TaskAssignment(task_id="t1", attempt=1, lease="l-1", task_type="x", input={}))
    with pytest.raises(ValueError, match="inline limit"):
        t.preview(b"x" * (MAX_PREVIEW_BYTES + 1), "image/png")
    with pytest.raises(ValueError, match="image/bmp"):
        t.preview(b"BM..", "image/bmp")
    t.preview(b"\xff\xd8\xff\xe0jpeg", "image/jpeg")
    t.preview_file("file_1", "image/webp")
    assert [(m.index, m.mime, m.file) for m in sent] == [(0, "image/jpeg", None), (1, "image/webp", "file_1")]
    assert base64.b64decode(sent[0].data) == b"\xff\xd8\xff\xe0jpeg"
    frame = json.loads(p.frame(sent[0]))
    assert frame["type"] == "preview" and frame["payload"]["lease"] == "l-1"
