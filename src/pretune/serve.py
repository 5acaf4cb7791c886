"""Serve a fine-tuned model over HTTP: ``pretune serve runs/clf/model`` (see docs/serving.md).

    POST /predict   {"inputs": [...], "pairs": [...], "top_k": 3} -> {"predictions": [...]}
    GET  /health    {"status": "ok", "model": PATH}
    GET  /metadata  kind, modality, labels, pretune.json, the run's test metrics and model card
    GET  /          a page to try the model (text box, image or audio drop, or numbers); GET /report: the run's report.html

The model is loaded once with :func:`pretune.load` and used only through the public predictor API
(``predict``, ``kind``, ``labels``, ``modality``, ``meta``, ``head.per_token``), so an exported
model that loads as the same API serves the same way.  A request is checked as it arrives
(:mod:`pretune.serve_requests`; a bad one gets a 4xx JSON ``{"error": "one line"}``, never a
traceback), then queued; one worker thread (torch is happiest called from one thread) gathers the
requests that arrive within ``window_ms`` into batches of up to ``max_batch`` inputs, calls
``predict`` once per batch and routes each request its own results.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import logging
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

import pretune
from pretune.errors import CheckpointError, PretuneError
from pretune.serve_requests import Job, parse, refuse, top

PAGE = Path(__file__).with_name("serve_page.html")
MAX_BODY_BYTES = 16 * 2**20
MAX_INPUTS = 512
ROUTES = "GET /, GET /health, GET /metadata, GET /report, POST /predict"
STOP: Any = object()  # queued to stop the worker thread
log = logging.getLogger("pretune.serve")


class Batcher:
    """One thread calls ``predictor.predict``: the first queued job opens a window of ``window_ms``
    during which later jobs join its batch, up to ``max_batch`` inputs (a job that would overflow waits
    for the next batch; a job larger than ``max_batch`` goes alone and ``predict`` splits it)."""

    def __init__(self, predictor: Any, max_batch: int, window_ms: float):
        self.predictor, self.max_batch, self.window = predictor, max_batch, window_ms / 1000
        self.queue: queue.Queue[Job] = queue.Queue()
        self.batches: collections.deque[list[int]] = collections.deque(maxlen=1000)  # inputs per request of the last predict calls
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._loop, name="pretune-predict", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.queue.put(STOP)
            self.thread.join(timeout=30)

    def submit(self, job: Job) -> concurrent.futures.Future:
        self.start()
        self.queue.put(job)
        return job.done

    def _loop(self) -> None:
        carry: Job | None = None
        while True:
            first = carry if carry is not None else self.queue.get()
            if first is STOP:
                return
            carry = None
            batch, size, deadline = [first], len(first.inputs), time.monotonic() + self.window
            while size < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    job = self.queue.get(timeout=left)
                except queue.Empty:
                    break
                if job is STOP or size + len(job.inputs) > self.max_batch:
                    carry = job  # stop after this batch, or the first job of the next one
                    break
                batch.append(job)
                size += len(job.inputs)
            self._run([job for job in batch if job.claim()])  # skip requests that have gone away

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        try:
            results = self._predict(batch)
        except Exception as exc:  # noqa: BLE001  (routed to the requests, which answer with one line)
            if len(batch) > 1:  # one request's bad input must not fail the others: each on its own
                for job in batch:
                    self._run([job])
                return
            if not isinstance(exc, PretuneError):
                log.exception("predicting failed")
            self._finish(batch[0], exception=exc)
            return
        start = 0
        for job in batch:
            self._finish(job, results[start:start + len(job.inputs)])
            start += len(job.inputs)

    def _predict(self, batch: list[Job]) -> list[dict[str, Any]]:
        inputs = [item for job in batch for item in job.inputs]
        pairs = [item for job in batch for item in job.pairs] if batch[0].pairs is not None else None
        self.batches.append([len(job.inputs) for job in batch])
        results = self.predictor.predict(inputs, pairs, batch_size=self.max_batch)
        if len(results) != len(inputs):
            raise RuntimeError(f"predict returned {len(results)} results for {len(inputs)} inputs")
        return results

    @staticmethod
    def _finish(job: Job, results: list | None = None, exception: BaseException | None = None) -> None:
        job.close()
        if exception is not None:
            job.done.set_exception(exception)
        else:
            job.done.set_result(results)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise refuse(413, f"the body is {int(declared):,} bytes; at most {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise refuse(413, f"the body is over {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# -- the app ----------------------------------------------------------------------------------------
def load_predictor(model: str | Path) -> Any:
    predictor = pretune.load(model)
    if not hasattr(predictor, "predict"):
        raise CheckpointError(f"{model}: a causal language model generates text, which pretune serve does not serve; "
                              f"use pretune generate {model} --prompt ...")
    return predictor


def read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def app(model: str | Path, max_batch: int = 32, max_body_bytes: int = MAX_BODY_BYTES, *,
        max_inputs: int = MAX_INPUTS, window_ms: float = 5.0) -> FastAPI:
    """The HTTP app serving the fine-tuned model at ``model`` (run it with any ASGI server)."""
    if max_batch < 1:
        raise PretuneError(f"max_batch (--max-batch) is {max_batch}; give at least 1")
    path = Path(model).resolve()
    predictor = load_predictor(model)
    batcher = Batcher(predictor, max_batch, window_ms)
    report = path.parent / "report.html"
    limits = {"max_batch": max_batch, "max_inputs": max_inputs, "max_body_bytes": max_body_bytes}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)

    api = FastAPI(title=f"pretune: {path.parent.name}/{path.name}", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    api.state.predictor, api.state.batcher = predictor, batcher

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        routing = {"Not Found": f"no route {request.method} {request.url.path}; the routes are {ROUTES}",  # the router's own
                   "Method Not Allowed": f"{request.method} is not allowed on {request.url.path}; the routes are {ROUTES}"}
        message = routing.get(exc.detail, exc.detail)
        return JSONResponse({"error": message}, exc.status_code, headers=getattr(exc, "headers", None))

    @api.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:  # logged with its traceback by the server
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server's log has the details"}, 500)

    @api.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        body = await read_body(request, max_body_bytes)
        job, top_k = await run_in_threadpool(parse, body, request.headers.get("content-type", ""), predictor, max_inputs)
        try:
            results = await asyncio.wrap_future(batcher.submit(job))
        except PretuneError as exc:  # the predictor rejected an input: its one-line message
            raise refuse(422, str(exc)) from None
        except Exception as exc:  # a bug: the worker logged its traceback
            raise refuse(500, f"internal error ({type(exc).__name__}) while predicting; the server's log has the details") from None
        return JSONResponse({"predictions": [top(result, top_k) for result in results]})

    @api.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": str(path)}

    @api.get("/metadata")
    async def metadata() -> dict[str, Any]:
        card = path / "README.md"
        return {"model": str(path), "kind": predictor.kind, "modality": predictor.modality, "labels": predictor.labels,
                "per_token": predictor.head.per_token, "pairs": predictor.meta.get("text_pair"), "meta": predictor.meta,
                "test_metrics": read_json_file(path.parent / "test_metrics.json"),
                "model_card": card.read_text(errors="replace") if card.is_file() else None,
                "report": "/report" if report.is_file() else None, "limits": limits}

    @api.get("/report")
    async def training_report() -> FileResponse:
        if not report.is_file():
            raise refuse(404, f"no training report ({report} does not exist; write it with pretune report {path.parent})")
        return FileResponse(report, media_type="text/html")

    @api.get("/")
    async def page() -> HTMLResponse:
        config = {"model": f"{path.parent.name}/{path.name}", "kind": predictor.kind, "modality": predictor.modality,
                  "labels": predictor.labels, "per_token": predictor.head.per_token, "report": report.is_file(),
                  "text": predictor.meta.get("text", "text"), "pairs": predictor.meta.get("text_pair"),
                  "input_shape": predictor.meta.get("input_shape")}
        return HTMLResponse(PAGE.read_text().replace('"__CONFIG__"', json.dumps(config).replace("</", "<\\/")))

    return api


def run(model: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 32) -> None:
    """Serve ``model`` until Ctrl-C; prints one line with the URL (``port=0`` picks a free port)."""
    api = app(model, max_batch=max_batch)
    sock = listen(host, port)
    address = f"[{host}]" if ":" in host else host
    print(f"pretune: serving {model} at http://{address}:{sock.getsockname()[1]}/ (Ctrl-C to stop)", flush=True)
    server = uvicorn.Server(uvicorn.Config(api, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])  # uvicorn shuts down cleanly on Ctrl-C, then raises it again
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()


def listen(host: str, port: int) -> socket.socket:
    """A bound socket, so that a busy port is one line rather than uvicorn's log and exit."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:  # socket.gaierror too
        if sock is not None:
            sock.close()
        raise PretuneError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --host or --port") from None
    sock.set_inheritable(True)
    return sock
