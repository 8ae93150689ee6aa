"""The official OpenAI Python SDK as the client of kiln's images API.

Starts the real `kiln` binary (path in $TEST_KILN_BIN; not KILN_*, which the server would read as settings) on a free 127.0.0.1 port with a throwaway
data directory and the built-in demo worker, and stops it by pid afterwards.
"""

import base64
import io
import json
import os
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
import zlib

import openai
import pytest


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def png(width, height, rgb):
    """A solid-colour PNG, written by hand so the test needs no imaging library."""
    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))

    def chunk(kind, data):
        c = kind + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def kiln():
    binary = os.environ["TEST_KILN_BIN"]
    data = tempfile.mkdtemp(prefix="kiln-sdk-")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(
        os.environ,
        KILN_SERVER__LISTEN=f"127.0.0.1:{port}",
        KILN_SERVER__DATA_DIR=data,
        KILN_LOG__FILTER="warn",
        KILN_GATEWAY__PUBLIC_BASE_URL=base,
        # A model whose task type no worker serves: its tasks stay queued.
        KILN_GATEWAY__OPENAI__MODELS__IDLE__GENERATE_TASK_TYPE="idle_gen",
        KILN_GATEWAY__OPENAI__MODELS__IDLE__EDIT_TASK_TYPE="idle_edit",
    )
    log = open(os.path.join(data, "server.log"), "wb")
    proc = subprocess.Popen([binary, "serve"], env=env, stdout=log, stderr=log)
    try:
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/v1/models", timeout=1) as r:
                    models = json.load(r)
                # The demo worker connects just after the listener opens.
                demo = [m for m in models["data"] if m["id"] == "kiln-demo"][0]
                if demo["kiln"]["workers_online"] >= 1:
                    break
            except OSError:
                pass
            assert proc.poll() is None, "kiln exited"
            assert time.time() < deadline, "kiln did not start"
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def client(kiln):
    return openai.OpenAI(base_url=f"{kiln}/v1", api_key="unused-on-loopback", max_retries=0, timeout=60)


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("content-type"), r.read()


def test_models_lists_the_demo_model(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert "kiln-demo" in ids
    m = client.models.retrieve("kiln-demo")
    assert m.owned_by == "kiln"


def test_generate_b64_json_n_and_size(client):
    r = client.images.generate(
        model="kiln-demo",
        prompt="a lighthouse at dusk",
        n=2,
        size="256x128",
        response_format="b64_json",
        quality="high",
    )
    assert r.created > 1_600_000_000
    assert len(r.data) == 2
    imgs = [base64.b64decode(d.b64_json) for d in r.data]
    assert [png_size(i) for i in imgs] == [(256, 128), (256, 128)]
    assert imgs[0] != imgs[1], "each image has its own seed"


def test_generate_url(client, kiln):
    r = client.images.generate(prompt="a red fox", size="64x64", response_format="url")
    assert len(r.data) == 1
    url = r.data[0].url
    assert url.startswith(f"{kiln}/v1/files/file_"), url
    status, ctype, body = get(url)
    assert status == 200 and ctype == "image/png"
    assert png_size(body) == (64, 64)


def test_edit_one_image(client):
    src = png(120, 80, (200, 30, 30))
    r = client.images.edit(
        model="kiln-demo",
        image=("red.png", src, "image/png"),
        prompt="grayscale",
        response_format="b64_json",
    )
    out = base64.b64decode(r.data[0].b64_json)
    assert png_size(out) == (120, 80)


def test_edit_several_images_with_size_and_n(client):
    imgs = [
        ("a.png", png(40, 40, (255, 0, 0)), "image/png"),
        ("b.png", png(80, 40, (0, 255, 0)), "image/png"),
        ("c.png", png(20, 40, (0, 0, 255)), "image/png"),
    ]
    r = client.images.edit(image=imgs, prompt="mirror", response_format="b64_json", n=2)
    outs = [base64.b64decode(d.b64_json) for d in r.data]
    # Side by side: 40 + 80 + 20 wide, 40 high.
    assert [png_size(o) for o in outs] == [(140, 40), (140, 40)]
    r = client.images.edit(image=imgs[:2], prompt="invert", size="64x32", response_format="b64_json")
    assert png_size(base64.b64decode(r.data[0].b64_json)) == (64, 32)


def test_edit_reference_images_are_compressed(client, kiln):
    # A noisy 2400 x 1600 PNG (several MB) must reach the worker within the model's
    # limits (2048 px long side by default): the output keeps the compressed size.
    import random

    rnd = random.Random(7)
    w, h = 2400, 1600
    raw = b"".join(b"\x00" + bytes(rnd.getrandbits(8) for _ in range(w * 3)) for _ in range(h))

    def chunk(kind, data):
        c = kind + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    big = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 1))
        + chunk(b"IEND", b"")
    )
    assert len(big) > 4 * 1024 * 1024
    r = client.images.edit(image=("big.png", big, "image/png"), prompt="grayscale", response_format="b64_json")
    out = base64.b64decode(r.data[0].b64_json)
    ow, oh = png_size(out)
    assert max(ow, oh) <= 2048 and (ow, oh) != (w, h)
    assert abs(ow / oh - 1.5) < 0.01


def test_errors_have_openai_shape(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", size="12x12")
    assert e.value.body["param"] == "size"
    assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="no-such-model", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="x", n=11)


def test_respond_async_then_poll_the_task(client, kiln):
    raw = client.images.with_raw_response.generate(
        prompt="async please",
        size="128x128",
        extra_headers={"Prefer": "respond-async"},
    )
    assert raw.status_code == 202
    task = json.loads(raw.text)
    # Relative, or absolute under the configured public base URL.
    assert raw.headers["location"].endswith(f"/v1/tasks/{task['id']}")
    assert raw.headers["preference-applied"] == "respond-async"
    assert task["status"] in ("queued", "running", "succeeded")
    deadline = time.time() + 30
    while task["status"] != "succeeded":
        assert task["status"] in ("queued", "running"), task
        assert time.time() < deadline, task
        time.sleep(0.1)
        _, _, body = get(f"{kiln}/v1/tasks/{task['id']}")
        task = json.loads(body)
    files = task["output"]["files"]
    assert len(files) == 1
    _, ctype, body = get(files[0]["url"])
    assert ctype == "image/png" and png_size(body) == (128, 128)
    # The task is visible in the task list too.
    _, _, body = get(f"{kiln}/v1/tasks?task_type=txt2img&limit=100")
    assert task["id"] in [t["id"] for t in json.loads(body)["data"]]


def test_idempotency_key_dedupes(client):
    key = {"Idempotency-Key": f"sdk-{time.time_ns()}"}
    a = client.images.with_raw_response.generate(prompt="same", size="32x32", extra_headers=key)
    b = client.images.with_raw_response.generate(prompt="same", size="32x32", extra_headers=key)
    assert a.headers["x-kiln-task-id"] == b.headers["x-kiln-task-id"]
    src = ("p.png", png(30, 30, (1, 2, 3)), "image/png")
    e1 = client.images.with_raw_response.edit(image=src, prompt="invert", extra_headers=key | {"Idempotency-Key": key["Idempotency-Key"] + "-e"})
    e2 = client.images.with_raw_response.edit(image=src, prompt="invert", extra_headers=key | {"Idempotency-Key": key["Idempotency-Key"] + "-e"})
    assert e1.headers["x-kiln-task-id"] == e2.headers["x-kiln-task-id"]
    with pytest.raises(openai.ConflictError):
        client.images.generate(prompt="different", size="32x32", extra_headers=key)


def test_wait_limit_answers_202_with_the_task(client, kiln):
    started = time.time()
    raw = client.images.with_raw_response.generate(
        model="idle", prompt="nobody serves this", extra_headers={"Prefer": "wait=1"}
    )
    elapsed = time.time() - started
    assert raw.status_code == 202
    assert 0.9 <= elapsed < 10, elapsed
    task = json.loads(raw.text)
    assert task["status"] == "queued" and task["task_type"] == "idle_gen"
    assert task["queue_position"] == 0
    m = client.models.retrieve("idle")
    assert m.model_extra["kiln"]["workers_online"] == 0
    # It is an ordinary task: cancel it through the task API.
    with urllib.request.urlopen(
        urllib.request.Request(f"{kiln}/v1/tasks/{task['id']}/cancel", method="POST"), timeout=10
    ) as r:
        assert r.status == 202


def partials_then_completed(events, prefix):
    """Checks the shape of a streamed call: partial images with indexes 0, 1, ..., then the
    completed image(s); returns (partials, completed) as decoded bytes."""
    kinds = [e.type for e in events]
    n = kinds.count(f"{prefix}.partial_image")
    assert kinds[:n] == [f"{prefix}.partial_image"] * n, kinds
    assert kinds[n:] and set(kinds[n:]) == {f"{prefix}.completed"}, kinds
    partials = events[:n]
    assert [e.partial_image_index for e in partials] == list(range(n))
    for e in events:
        assert e.created_at > 1_600_000_000
        assert e.output_format == "png" and e.quality == "auto" and e.background == "auto"
    return [base64.b64decode(e.b64_json) for e in partials], [base64.b64decode(e.b64_json) for e in events[n:]]


def test_generate_streams_partial_images_then_the_completed_image(client):
    stream = client.images.generate(
        model="kiln-demo", prompt="a lighthouse at dusk", size="512x512", stream=True, partial_images=2
    )
    events = list(stream)
    partials, completed = partials_then_completed(events, "image_generation")
    assert len(partials) == 2, [e.type for e in events]
    assert len(completed) == 1
    assert png_size(completed[0]) == (512, 512)
    assert events[-1].size == "512x512" and events[-1].usage is not None
    # Coarse, then finer: the previews are smaller than the image and differ.
    assert all(png_size(p) == (256, 256) for p in partials)
    assert partials[0] != partials[1]


def test_edit_streams_partial_images_then_the_completed_image(client):
    src = png(120, 80, (200, 30, 30))
    stream = client.images.edit(
        model="kiln-demo",
        image=("red.png", src, "image/png"),
        prompt="invert",
        stream=True,
        partial_images=2,
    )
    events = list(stream)
    partials, completed = partials_then_completed(events, "image_edit")
    assert len(partials) == 2 and len(completed) == 1, [e.type for e in events]
    assert png_size(completed[0]) == (120, 80)


def test_stream_with_no_partial_images_sends_only_the_completed_image(client):
    events = list(client.images.generate(prompt="a red fox", size="64x64", stream=True, partial_images=0))
    assert [e.type for e in events] == ["image_generation.completed"]
    assert png_size(base64.b64decode(events[0].b64_json)) == (64, 64)


def test_streamed_partial_images_are_in_the_requested_format(client):
    events = list(
        client.images.generate(
            prompt="a red fox", size="128x128", stream=True, partial_images=1, output_format="webp", output_compression=70
        )
    )
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    for e in events:
        assert e.output_format == "webp"
        data = base64.b64decode(e.b64_json)
        assert data[:4] == b"RIFF" and data[8:12] == b"WEBP", data[:16]


def test_output_format_is_applied_when_the_worker_returns_png(client, kiln):
    r = client.images.generate(
        prompt="a red fox",
        size="96x64",
        response_format="b64_json",
        output_format="jpeg",
        output_compression=40,
        quality="low",
        background="opaque",
        moderation="low",
    )
    data = base64.b64decode(r.data[0].b64_json)
    assert data[:3] == b"\xff\xd8\xff", data[:8]
    r = client.images.generate(prompt="a red fox", size="96x64", response_format="url", output_format="webp")
    status, ctype, body = get(r.data[0].url)
    assert status == 200 and ctype == "image/webp" and body[8:12] == b"WEBP"


def test_image_options_are_validated_as_openai_does(client):
    for kw, param in [
        ({"partial_images": 4, "stream": True}, "partial_images"),
        ({"output_compression": 101, "output_format": "jpeg"}, "output_compression"),
        ({"output_compression": 50}, "output_compression"),
        ({"background": "transparent", "output_format": "jpeg"}, "background"),
        ({"quality": "ultra"}, "quality"),
        ({"moderation": "off"}, "moderation"),
        ({"output_format": "tiff"}, "output_format"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(prompt="x", **kw)
        assert e.value.body["param"] == param, (kw, e.value.body)


def test_images_routes_are_in_the_openapi_document(kiln):
    status, _, body = get(f"{kiln}/openapi.json")
    paths = json.loads(body)["paths"]
    for p in ["/v1/images/generations", "/v1/images/edits", "/v1/models", "/v1/tasks/{id}/preview"]:
        assert p in paths, sorted(paths)
    gen = paths["/v1/images/generations"]["post"]
    assert "text/event-stream" in json.dumps(gen["responses"])
