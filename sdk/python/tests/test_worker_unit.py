"""Worker logic that a real gateway seldom exercises on cue: a replayed assign answered from
the stored result, an oversized outbox entry rewritten before it is ever resent, a handler-less
task type refused, and progress coalescing."""

import asyncio
import json

from kiln_worker import Worker, protocol as p
from kiln_worker.outbox import Entry, Outbox


def worker(tmp_path, **kw):
    w = Worker("ws://127.0.0.1:9/v1/workers/connect", state_dir=str(tmp_path), **kw)
    w.handler("t")(lambda task: {"ok": True})
    return w


def frames(q):
    out = []
    while not q.empty():
        out.append(json.loads(q.get_nowait()))
    return out


def assignment(lease, task_id="task_1", attempt=1, task_type="t"):
    return p.TaskAssignment(task_id=task_id, attempt=attempt, lease=lease, task_type=task_type, input={})


def test_a_replayed_assign_is_answered_with_the_stored_result(tmp_path):
    Outbox(str(tmp_path)).put(Entry("task_1", 1, p.Result(lease="l-old", status="ok", output={"files": [{"id": "f1"}]})))
    w = worker(tmp_path)
    w._open_state()

    async def go():
        w._queue = asyncio.Queue()
        w._start(assignment("l-new"))
        w._start(assignment("l-x", task_id="task_x", task_type="nobody-serves-this"))
        return frames(w._queue)

    sent = asyncio.run(go())
    assert [f["type"] for f in sent] == ["result", "reject"]
    assert sent[0]["payload"] == {"lease": "l-new", "status": "ok", "output": {"files": [{"id": "f1"}]}}
    assert sent[1]["payload"]["retryable"] is False and not w._running


def test_an_oversized_outbox_entry_is_rewritten_as_result_too_large(tmp_path):
    Outbox(str(tmp_path)).put(Entry("task_2", 1, p.Result(lease="l-big", status="ok", output="x" * (2 << 20))))
    w = worker(tmp_path)
    w._open_state()
    again = Outbox(str(tmp_path)).get("l-big")
    assert again is not None and again.result.status == "error"
    assert again.result.error.code == "result_too_large" and "POST /v1/files" in again.result.error.message
    assert w._frame_limit == p.DEFAULT_MAX_FRAME_BYTES


def test_progress_is_rate_limited_and_the_latest_value_is_flushed(tmp_path):
    w = worker(tmp_path, progress_interval_s=0.2)

    async def go():
        from kiln_worker.task import Task

        w._loop = asyncio.get_running_loop()
        w._queue = asyncio.Queue()
        t = Task(w, assignment("l-p"))
        for i in range(50):  # from a handler thread, as handlers do
            await w._loop.run_in_executor(None, t.progress, i, 50)
        await asyncio.sleep(0.35)  # past the interval: the coalesced last value goes out
        return frames(w._queue)

    sent = asyncio.run(go())
    steps = [f["payload"]["step"] for f in sent if f["type"] == "progress"]
    assert steps[0] == 0 and steps[-1] == 49, steps
    assert len(steps) <= 4, steps


def test_an_issued_worker_secret_is_stored_0600_and_loaded_by_the_next_process(tmp_path):
    import os
    import stat

    w = worker(tmp_path)
    w._open_state()
    assert w._secret is None
    w._store_secret("wks_" + "ab" * 32)
    path = tmp_path / "worker_secret"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = worker(tmp_path)
    again._open_state()
    assert again._secret == "wks_" + "ab" * 32 and again.worker_id == w.worker_id and again.boot_id != w.boot_id
    hello = json.loads(again._frame(again._hello(again._outbox.all())))
    assert hello["payload"]["worker_secret"] == again._secret and "resume" not in hello["payload"]
    assert not p.should_reconnect(p.CLOSE_IDENTITY) and p.should_reconnect(p.CLOSE_TOO_BIG)
