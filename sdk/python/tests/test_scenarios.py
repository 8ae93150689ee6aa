"""The SDK against the real `kiln serve` and real worker processes: completion, backlog,
crashes of either side, cancel, drain, SIGTERM, failures and oversized results."""

import os
import signal
import struct
import time
import urllib.request

from conftest import SDK, Server, wait_until

SLEEPY = SDK / "examples" / "sleepy_worker.py"


def starts(worker, tid):
    return [(e["task"], e["attempt"]) for e in worker.events("start", tid)]


def test_twenty_tasks_complete_once_with_the_sleepy_example(env):
    s = env.server
    w = env.worker(script=SLEEPY, args=["--url", s.ws_url, "--state-dir", env.state, "--task-type", "sleepy", "--sleep-s", "0.2"])
    ids = [s.submit("sleepy", {"n": i}) for i in range(20)]
    for tid in ids:
        t = s.wait_status(tid, ("succeeded",), 60)
        assert len(t["attempts"]) == 1, t["attempts"]
        files = t["output"]["files"]
        assert len(files) == 1 and files[0]["id"].startswith("file_"), files
        assert set(t["timings"]["worker"]) >= {"sleep_ms", "upload_ms"}, t["timings"]
    with urllib.request.urlopen(s.base + t["output"]["files"][0]["url"], timeout=10) as r:
        data = r.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (16, 16)
    assert w.proc.poll() is None


def test_backlog_submitted_with_no_worker_is_drained(env):
    s = env.server
    ids = [s.submit("t_sleep", {"sleep_s": 0.1}) for _ in range(12)]
    time.sleep(0.5)
    assert all(s.task(t)["status"] == "queued" for t in ids)
    w = env.worker(slots=3)
    for tid in ids:
        t = s.wait_status(tid, ("succeeded",), 60)
        assert len(t["attempts"]) == 1 and t["output"] == {"task": tid, "attempt": 1}
        assert starts(w, tid) == [(tid, 1)]

    def gpu():  # w.gpu_stats() reaches the gateway through heartbeats
        ws = s.call("GET", "/v1/workers")[1]["data"]
        return ws and ws[0].get("gpu")

    assert wait_until(gpu, 10, "gpu stats in a heartbeat") == {"util": 12.5, "mem_used_mb": 100, "mem_total_mb": 1000}


def test_worker_sigkill_mid_task_runs_it_again_once(env):
    s = env.server
    a = env.worker()
    tid = s.submit("t_sleep", {"sleep_s": 3})
    wait_until(lambda: a.events("start", tid), 20, "the first attempt to start")
    a.kill9()
    b = env.worker()  # same state dir: same worker id, new boot id
    t = s.wait_status(tid, ("succeeded",), 30)
    assert t["output"] == {"task": tid, "attempt": 2}
    assert [x["attempt"] for x in t["attempts"]] == [1, 2]
    assert "restarted" in (t["attempts"][0]["error"] or ""), t["attempts"]
    assert starts(b, tid) == [(tid, 1), (tid, 2)]  # the shared log: one run per attempt


def test_outboxed_result_is_accepted_after_a_crash_of_both_without_a_rerun(env):
    s = env.server
    a = env.worker()
    tid = s.submit("t_sleep", {"sleep_s": 1.5})
    wait_until(lambda: a.events("start", tid), 20, "the task to start")
    s.kill9()  # the task finishes while the gateway is down: its result waits in the outbox
    outbox = os.path.join(env.state, "outbox")
    # A `.json` entry: the `.tmp` it is written through is dropped if the process dies first.
    wait_until(
        lambda: any(n.endswith(".json") for n in os.listdir(outbox)), 10, "the result in the outbox"
    )
    a.kill9()
    s.start()
    env.worker()  # a new process finds the result on disk and names it in hello
    t = s.wait_status(tid, ("succeeded",), 30)
    assert t["output"] == {"task": tid, "attempt": 1}
    assert len(t["attempts"]) == 1
    assert starts(a, tid) == [(tid, 1)]
    wait_until(lambda: not os.listdir(outbox), 10, "the outbox to empty after result_ack")


def test_server_kill9_with_tasks_running_and_queued_completes_each_once(env):
    s = env.server
    w = env.worker(slots=2)
    ids = [s.submit("t_sleep", {"sleep_s": 1.5}) for _ in range(6)]
    wait_until(lambda: len(w.events("start")) >= 2, 20, "two tasks to run")
    s.kill9()
    time.sleep(0.5)
    s.start()
    for tid in ids:
        t = s.wait_status(tid, ("succeeded",), 60)
        assert len(t["attempts"]) == 1, t["attempts"]
        assert starts(w, tid) == [(tid, 1)]
    assert len(w.events("start")) == 6


def test_cancel_reaches_a_running_handler_within_a_second(env):
    s = env.server
    w = env.worker(slots=2)
    for kind in ("t_cancel", "t_async"):
        tid = s.submit(kind)
        wait_until(lambda: w.events("start", tid), 20, f"{kind} to start")
        sent = time.time()
        status, body = s.call("POST", f"/v1/tasks/{tid}/cancel")
        assert status in (200, 202), (status, body)
        seen = wait_until(lambda: w.events("cancel_seen", tid), 5, f"{kind} to see the cancel")
        took = seen[0]["t"] - sent
        print(f"\n{kind}: the cancel reached the running handler {took * 1000:.0f} ms after POST /cancel")
        assert took < 1.0, f"{kind}: cancel took {took:.3f} s"
        t = s.wait_status(tid, ("canceled",), 10)
        assert t["output"] is None


def test_drain_finishes_the_running_task_takes_no_more_and_says_bye(env):
    s = env.server
    w = env.worker(slots=1)
    first = s.submit("t_sleep", {"sleep_s": 1.5})
    wait_until(lambda: w.events("start", first), 20, "the first task to start")
    second = s.submit("t_sleep", {"sleep_s": 0.1})
    status, body = s.call("POST", f"/v1/workers/{w.worker_id()}/drain")
    assert status == 202, (status, body)
    assert w.proc.wait(timeout=20) == 0, w.output()[-2000:]
    assert s.task(first)["status"] == "succeeded"
    assert s.task(second)["status"] == "queued" and not w.events("start", second)
    assert "bye: shutting down" in s.log()


def test_sigterm_finishes_running_work_then_sends_bye(env):
    s = env.server
    w = env.worker(slots=1)
    tid = s.submit("t_sleep", {"sleep_s": 1.5})
    wait_until(lambda: w.events("start", tid), 20, "the task to start")
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(timeout=20) == 0, w.output()[-2000:]
    t = s.task(tid)
    assert t["status"] == "succeeded" and len(t["attempts"]) == 1, t
    assert "bye: shutting down" in s.log()
    assert not os.listdir(os.path.join(env.state, "outbox"))  # acknowledged before bye
    status, body = s.call("GET", "/v1/workers")
    me = [x for x in body["data"] if x["worker_id"] == w.worker_id()]
    assert len(me) == 1 and me[0]["connected"] is False, body


def test_sigterm_past_the_grace_releases_the_task_to_run_elsewhere(env):
    s = env.server
    w = env.worker(slots=1, grace_s=0.5)
    tid = s.submit("t_sleep", {"sleep_s": 30})
    wait_until(lambda: w.events("start", tid), 20, "the task to start")
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(timeout=20) == 0, w.output()[-2000:]
    # Given back, not left to lapse (that would take the 90 s lease): queued again at once,
    # and another worker takes it.
    s.wait_status(tid, ("queued",), 5)
    other = env.worker(state_dir=os.path.join(env.root, "other-worker"))
    wait_until(lambda: len(other.events("start", tid)) == 2, 10, "another worker to take the task")
    assert s.task(tid)["status"] == "running"


def test_a_handler_that_raises_fails_the_attempt_with_its_message(env):
    s = env.server
    w = env.worker()
    tid = s.submit("t_fail", {"message": "boom: the GPU caught fire"})
    t = s.wait_status(tid, ("failed",), 30)
    assert "boom: the GPU caught fire" in (t["attempts"][-1]["error"] or ""), t["attempts"]
    assert t["error"]["code"] == "handler_error", t["error"]
    assert "RuntimeError: boom: the GPU caught fire" in t["error"]["message"]
    assert w.proc.poll() is None


def test_a_result_over_the_frame_limit_fails_the_task_with_result_too_large(env):
    s = env.server
    w = env.worker()
    tid = s.submit("t_big", {"bytes": 2 << 20})
    t = s.wait_status(tid, ("failed",), 30)
    assert t["error"]["code"] == "result_too_large", t["error"]
    assert "task.upload" in t["error"]["message"]
    wait_until(lambda: not os.listdir(os.path.join(env.state, "outbox")), 10, "an empty outbox")
    ok = s.submit("t_sleep", {"sleep_s": 0.1})  # the connection survived: no oversized frame was sent
    s.wait_status(ok, ("succeeded",), 30)
    assert "Space limit exceeded" not in s.log() and w.proc.poll() is None


def test_a_network_blip_resumes_the_session_without_redelivery(env):
    from conftest import Proxy

    s = env.server
    proxy = Proxy(s.port)
    try:
        w = env.worker(url=proxy.ws_url)
        tid = s.submit("t_sleep", {"sleep_s": 2})
        wait_until(lambda: w.events("start", tid), 20, "the task to start")
        proxy.cut()  # same process, same boot: it resumes and keeps its lease
        wait_until(lambda: proxy.accepted >= 2, 10, "the worker to reconnect")
        t = s.wait_status(tid, ("succeeded",), 30)
        assert len(t["attempts"]) == 1 and t["output"] == {"task": tid, "attempt": 1}
        assert starts(w, tid) == [(tid, 1)]
        assert "resumed=True" in w.output()
    finally:
        proxy.close()


def test_a_wrong_worker_token_stops_the_worker_and_the_right_one_works(tmp_path):
    import subprocess

    from conftest import kiln_bin

    good = "worker-secret-token"
    h = subprocess.run([kiln_bin(), "config", "hash-key", good], capture_output=True, text=True, check=True)
    s = Server(str(tmp_path), {"KILN_GATEWAY__WORKER_TOKEN_HASHES": h.stdout.strip().splitlines()[-1]}).start()
    try:
        from conftest import WorkerProc

        def sleepy(token, state):
            args = ["--url", s.ws_url, "--state-dir", str(tmp_path / state), "--task-type", "sleepy",
                    "--sleep-s", "0", "--token", token]
            return WorkerProc(s, str(tmp_path / state), str(tmp_path / f"{state}.log"), script=SLEEPY, args=args)

        bad = sleepy("wrong", "bad")
        assert bad.proc.wait(timeout=20) != 0
        assert "WorkerRefused" in bad.output() and "401" in bad.output()
        ok = sleepy(good, "good")
        try:
            tid = s.submit("sleepy")
            t = s.wait_status(tid, ("succeeded",), 30)  # the upload carried the token too
            assert t["output"]["files"][0]["id"].startswith("file_")
        finally:
            ok.stop()
    finally:
        s.stop()
