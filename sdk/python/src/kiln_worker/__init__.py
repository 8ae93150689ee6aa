"""kiln-worker: the Python SDK of kiln's GPU worker protocol (``kiln.v1``).

A worker connects out to the kiln gateway over a WebSocket, registers its task types,
runs each assigned task in its handler, reports progress, and keeps every result in a
crash-safe on-disk outbox until the gateway acknowledges it::

    from kiln_worker import Worker, Task

    w = Worker("ws://127.0.0.1:8080/v1/workers/connect", state_dir="./state")

    @w.handler("txt2img")
    def txt2img(task: Task) -> dict:
        task.progress(1, 2, stage="sampling")
        with task.stage("upload"):
            f = task.upload(b"...png bytes...", "image/png")
        return task.files(f)

    w.run()

See README.md for every guarantee.
"""

from .files import UploadError
from .protocol import DEFAULT_MAX_FRAME_BYTES, SUBPROTOCOL
from .task import Cancelled, Reject, Task, TaskFailed
from .worker import RESULT_TOO_LARGE, Worker, WorkerRefused

__all__ = [
    "Worker",
    "Task",
    "Reject",
    "Cancelled",
    "TaskFailed",
    "UploadError",
    "WorkerRefused",
    "RESULT_TOO_LARGE",
    "DEFAULT_MAX_FRAME_BYTES",
    "SUBPROTOCOL",
]
__version__ = "0.1.0"
