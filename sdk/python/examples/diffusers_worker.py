"""How a real diffusers pipeline plugs into kiln (txt2img on one GPU).

NOT RUN IN CI: it needs a GPU, `pip install diffusers transformers accelerate torch`, and
model weights from a hub. kiln's test suite runs examples/sleepy_worker.py instead, which
exercises the same SDK paths (progress, cancel, stage timings, upload, files output).

    python sdk/python/examples/diffusers_worker.py --url ws://gateway:8080/v1/workers/connect \
        --state-dir /var/lib/kiln-worker --model stabilityai/sdxl-turbo --token "$KILN_WORKER_TOKEN"

Tasks: {"task_type": "txt2img", "model": "<--model>", "input": {"prompt": "...", "steps": 4,
"width": 1024, "height": 1024, "seed": 7}}.
"""

import argparse
import io
import logging

from kiln_worker import Reject, Task, TaskFailed, Worker


def main() -> None:
    ap = argparse.ArgumentParser(description="kiln worker running a diffusers text-to-image pipeline")
    ap.add_argument("--url", required=True)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--model", required=True, help="diffusers model id or path; also the routing model name")
    ap.add_argument("--token", default=None)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)

    # Imported lazily so that `--help` works without the heavy dependencies.
    import torch
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(args.model, torch_dtype=torch.float16).to(args.device)
    w = Worker(args.url, token=args.token, state_dir=args.state_dir, slots=1, models=[args.model])

    @w.gpu_stats
    def gpu() -> dict:
        free, total = torch.cuda.mem_get_info()
        return {"mem_used_mb": (total - free) >> 20, "mem_total_mb": total >> 20}

    @w.handler("txt2img")
    def txt2img(task: Task) -> dict:
        inp = task.input or {}
        if task.model not in (None, args.model):
            raise Reject(f"model {task.model} is not loaded here", retryable=True)
        steps = int(inp.get("steps", 30))
        gen = torch.Generator(args.device).manual_seed(int(inp.get("seed", 0)))

        def on_step(p, i, t, kw):  # diffusers' step callback: progress + cancel between steps
            task.check_cancelled()
            task.progress(i + 1, steps, stage="sampling")
            return kw

        try:
            with task.stage("render"):
                image = pipe(
                    inp["prompt"],
                    num_inference_steps=steps,
                    width=int(inp.get("width", 1024)),
                    height=int(inp.get("height", 1024)),
                    generator=gen,
                    callback_on_step_end=on_step,
                ).images[0]
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            raise TaskFailed("out_of_memory", str(e), retryable=True) from None
        with task.stage("encode"):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
        with task.stage("upload"):
            f = task.upload(buf.getvalue(), "image/png")
        return task.files(f)

    w.run()


if __name__ == "__main__":
    main()
