"""The SDK's wire types against the protocol's golden frames (crates/protocol/tests/golden)."""

import json
import os
import pathlib

import pytest

from kiln_worker import protocol as p

GOLDEN = pathlib.Path(__file__).resolve().parents[3] / "crates" / "protocol" / "tests" / "golden"


def vectors():
    files = sorted(GOLDEN.glob("*.json"))
    assert len(files) >= 15, f"expected a golden vector per message type in {GOLDEN}"
    return files


@pytest.mark.parametrize("path", vectors(), ids=lambda f: f.stem)
def test_golden_frame_decodes_and_reencodes(path):
    text = path.read_text()
    env = p.Envelope.decode(text)
    want = json.loads(text)
    assert p.type_name(env.message) == want["type"]
    assert isinstance(env.message, p.MESSAGE_TYPES[want["type"]])
    assert json.loads(env.encode()) == want


def test_every_message_type_has_a_vector():
    seen = {json.loads(f.read_text())["type"] for f in vectors()}
    assert seen >= set(p.MESSAGE_TYPES), set(p.MESSAGE_TYPES) - seen


@pytest.mark.parametrize("path", vectors(), ids=lambda f: f.stem)
def test_unknown_fields_are_ignored(path):
    v = json.loads(path.read_text())
    v["added_later"] = {"x": 1}
    v["payload"]["also_new"] = [1, 2]
    env = p.Envelope.decode(json.dumps(v))
    assert p.type_name(env.message) == v["type"]


def test_bad_frames_are_refused_with_their_code():
    with pytest.raises(p.DecodeError) as e:
        p.Envelope.decode("{not json")
    assert e.value.code == "malformed"
    with pytest.raises(p.DecodeError) as e:
        p.Envelope.decode('{"type":"teleport","version":"1","payload":{}}')
    assert e.value.code == "unknown_type"
    with pytest.raises(p.DecodeError) as e:
        p.Envelope.decode('{"type":"ack","version":"2","payload":{"seq":1}}')
    assert e.value.code == "version"
    with pytest.raises(p.DecodeError) as e:
        p.Envelope.decode('{"type":"ack","version":"1","payload":{"seq":"one"}}')
    assert e.value.code == "malformed"
    with pytest.raises(p.DecodeError) as e:
        p.Envelope.decode('{"type":"assign","version":"1","payload":{"seq":1}}')
    assert e.value.code == "malformed"


def test_legacy_result_slot_is_read_when_output_is_absent():
    env = p.Envelope.decode('{"type":"result","version":"1","payload":{"lease":"l","status":"ok"},"result":{"a":1}}')
    assert env.message.output == {"a": 1}


def test_retry_hint_and_reconnect_rules():
    assert p.retry_after_ms("restarting; retry_after_ms=5000") == 5000
    assert p.retry_after_ms("restarting") is None
    assert p.should_reconnect(p.CLOSE_RESTART)
    assert not p.should_reconnect(p.CLOSE_AUTH)
    assert not p.should_reconnect(p.CLOSE_VERSION)


def test_outbox_entries_survive_reopen_and_torn_files_are_skipped(tmp_path):
    from kiln_worker.outbox import Entry, Outbox

    ob = Outbox(str(tmp_path))
    ob.put(Entry("t1", 2, p.Result(lease="l-1", status="ok", output={"files": [{"id": "f"}]})))
    (tmp_path / "outbox" / "l-2.json").write_text('{"task_id": "t2", "att')  # torn
    (tmp_path / "outbox" / "l-3.json.tmp").write_text("{}")
    again = Outbox(str(tmp_path))
    assert [(e.task_id, e.attempt, e.result.output) for e in again.all()] == [("t1", 2, {"files": [{"id": "f"}]})]
    assert not os.path.exists(tmp_path / "outbox" / "l-3.json.tmp")
    again.remove("l-1")
    assert len(Outbox(str(tmp_path))) == 0
