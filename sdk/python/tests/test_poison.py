"""One bad task never stops the others, with the real `kiln serve` (embedded limits: task
input 256 KiB, frames 1 MiB) and a real Python worker process whose own limit on incoming
frames is lowered to 64 KiB, so that a task the gateway accepts can still be too large for
the worker: an input over the gateway's limit is refused with 413; a poison task (its
assign frame over the worker's limit, refused with `error: "oversized"`) is dead-lettered
as `assign_failed` after 3 failed assignments while the worker keeps its one session and a
normal task submitted right after it completes; a cancel of an unacked assign (the worker
process stopped with SIGSTOP) takes effect at once (the worker still reads the assign that
was already on the wire when it resumes, and its handler sees the cancel right after)."""

import signal
import time

from conftest import wait_until

WORKER_MAX_FRAME = 64 << 10
"""The worker's limit on frames from the gateway in these tests (the gateway's is 1 MiB)."""

INPUT_LIMIT = 262144
"""`gateway.max_task_input_bytes`, its default."""


def small_frame_worker(env, slots):
    w = env.worker(slots=slots, extra_args=["--max-incoming-frame-bytes", str(WORKER_MAX_FRAME)])
    return w, online(env.server, w)


def online(s, w):
    """The worker's row in GET /v1/workers once it is connected."""

    def row():
        status, body = s.call("GET", "/v1/workers")
        assert status == 200, (status, body)
        me = [x for x in body["data"] if x["worker_id"] == w.worker_id() and x["connected"]]
        return me[0] if me else None

    return wait_until(row, 20, "the worker to be listed online")


def test_a_task_input_over_max_task_input_bytes_is_refused_with_413(env):
    s = env.server
    small_frame_worker(env, slots=1)
    status, body = s.call("POST", "/v1/tasks", {"task_type": "t_sleep", "input": {"pad": "x" * (INPUT_LIMIT + 1)}})
    assert status == 413, (status, body)
    assert isinstance(body, dict) and body["error"]["code"] == "payload_too_large", body
    msg = body["error"]["message"]
    assert "max_task_input_bytes" in msg and str(INPUT_LIMIT) in msg, msg
    status, listed = s.call("GET", "/v1/tasks")
    assert status == 200 and listed["data"] == [], listed  # nothing was stored


def test_a_poison_task_is_dead_lettered_as_assign_failed_while_the_worker_stays_up(env):
    s = env.server
    w, before = small_frame_worker(env, slots=2)
    # Under the gateway's input limit, over the worker's frame limit.
    poison = s.submit("t_sleep", {"sleep_s": 0.1, "pad": "p" * (100 << 10)})
    submitted = time.monotonic()
    normal = s.submit("t_sleep", {"sleep_s": 0.1})
    poison_then = s.task(poison)["status"]
    t = s.wait_status(normal, ("succeeded",), 10)
    took = time.monotonic() - submitted
    print(f"\nthe normal task succeeded {took * 1000:.0f} ms after its submission (poison was {poison_then})")
    assert took < 5.0, f"the normal task took {took:.3f} s"
    assert t["output"] == {"task": normal, "attempt": 1}

    p = s.wait_status(poison, ("failed", "succeeded", "canceled"), 20)
    assert p["status"] == "failed", p
    assert p["dead_lettered"] is True, p
    assert p["error"]["code"] == "assign_failed", p["error"]
    assert "3 times" in p["error"]["message"], p["error"]
    assert not w.events("start", poison)  # the handler never saw it
    out = w.output()
    assert out.count("oversized frame from gateway") == 3, out[-3000:]
    assert s.log().count("assignment failed on the transport") == 3

    # Not flapping: one connection all along, the same session still listed online.
    assert out.count("connected session=") == 1, out[-3000:]
    after = online(s, w)
    assert (after["session"], after["boot_id"]) == (before["session"], before["boot_id"]), (before, after)
    assert w.proc.poll() is None
    later = s.submit("t_sleep", {"sleep_s": 0.1})  # nothing is left stuck
    s.wait_status(later, ("succeeded",), 10)


def test_cancel_of_an_unacked_assign_takes_effect_at_once(env):
    s = env.server
    w, before = small_frame_worker(env, slots=1)
    w.proc.send_signal(signal.SIGSTOP)  # it cannot ack the assign now (dead_after is 45 s)
    try:
        tid = s.submit("t_cancel")
        wait_until(lambda: s.task(tid)["status"] == "running", 5, "the task to be assigned")
        status, body = s.call("POST", f"/v1/tasks/{tid}/cancel")
        assert status in (200, 202), (status, body)
        t = s.task(tid)
        assert t["status"] == "canceled", f"not canceled at once: {t}"
    finally:
        w.proc.send_signal(signal.SIGCONT)
    after = s.submit("t_sleep", {"sleep_s": 0.1})  # the slot is free again
    s.wait_status(after, ("succeeded",), 10)
    # The assign frame was in the worker's socket buffer before the cancel: on SIGCONT the
    # worker reads it and starts the handler, then reads the cancel that follows it. Never
    # more than that one start, and the cancel stops it at once.
    starts = w.events("start", tid)
    assert len(starts) <= 1, starts
    if starts:
        seen = wait_until(lambda: w.events("cancel_seen", tid), 5, "the handler to see the cancel")
        assert seen[0]["t"] - starts[0]["t"] < 1.0, (starts, seen)
    t = s.task(tid)
    assert t["status"] == "canceled" and t["output"] is None, t
    assert len(t["attempts"]) == 1, t["attempts"]
    assert "before the worker acknowledged" in (t["attempts"][0]["error"] or ""), t["attempts"]
    assert online(s, w)["session"] == before["session"]
