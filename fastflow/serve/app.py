"""The ASGI app (FastAPI): the OpenAI-style images API over the :class:`~.engine.Engine`.

Routes: POST /v1/images/generations (JSON; ``"stream": true`` answers Server-Sent Events),
POST /v1/images/edits (multipart), GET /health, /v1/models, /metrics and / (the web page). Every
error is ``{"error": {"message", "type", "code"}}`` with its HTTP status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .config import ServeConfig
from .engine import Engine
from .loras import LoraRegistry
from .metrics import Metrics
from .model import check_cache_name, load_pipeline, prepare
from .protocol import ApiError, Limits, parse_generation
from .ranks import parallel_sizes, split

log = logging.getLogger("fastflow.serve")
PAGE = Path(__file__).resolve().parent / "static" / "index.html"


class ClientGone(Exception):
    """The client closed its connection before its images were ready."""


class Server:
    """What the routes share: config, engine, metrics, LoRAs, and the model's info once loaded."""

    def __init__(self, config: ServeConfig, pipe=None):
        check_cache_name(config.cache)
        self.config, self.metrics = config, Metrics()
        self.loras = LoraRegistry(config.loras, config.lora_dir)
        self.limits = Limits(config.max_images, config.max_pixels, config.max_steps, config.cache)
        self.info = None
        self.created = int(time.time())

        def load():
            p = pipe if pipe is not None else load_pipeline(config)
            if config.parallel is not None:  # rank 0 of a torchrun group (serve/ranks.py)
                self.engine.mirror = split(p, parallel_sizes(config.parallel))
            self.info = prepare(p, config, self.loras)
            return p

        self.engine = Engine(load, config.max_batch, config.max_queue, config.batch_window_ms, self.metrics,
                             self.loras.apply)  # fmt: skip

    def check_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.config.api_key.encode()):
            raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                           "invalid_api_key", {"WWW-Authenticate": "Bearer"})  # fmt: skip

    def check_ready(self) -> None:
        if not self.engine.accepting:
            raise ApiError(503, "the server is shutting down", "shutting_down")
        if not self.engine.ready.is_set():
            failed = self.engine.failed
            raise ApiError(503, f"the model failed to load: {failed}" if failed else "the model is still loading",
                           "loading", {"Retry-After": "5"})  # fmt: skip

    async def read_body(self, request: Request) -> bytes:
        """The body, at most max_body_bytes (413 beyond, before reading it where the length is given)."""
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise ApiError(413, f"the request body is over the limit of {limit} bytes", "body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is over the limit of {limit} bytes", "body_too_large")
            chunks.append(chunk)
        body = b"".join(chunks)
        request._body = body  # Starlette reads a form from the body already read
        return body

    def answer(self, work, result) -> dict:
        import base64

        images, used = result
        return {
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(png).decode("ascii"), "seed": seed} for png, seed in images],
            "model": self.info.name,
            "settings": {**work.settings(self.info.name), **used},
        }

    async def wait(self, job, request: Request):
        """The job's images; ApiError (504 past the deadline), ClientGone when the client left."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            left = max(0.0, job.deadline - time.monotonic())
            done, _ = await asyncio.wait({job.future, gone}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if job.future in done:
                return job.future.result()
            job.cancel()
            if gone in done:
                raise ClientGone
            raise ApiError(504, f"the request took longer than {self.config.timeout_s} s", "timeout")
        finally:
            gone.cancel()

    async def generate(self, work, request: Request):
        job = self.engine.submit(work, self.config.timeout_s)
        if not work.stream:
            try:
                results = await self.wait(job, request)
            except ClientGone:
                return Response(status_code=499)
            return JSONResponse(self.answer(work, results))
        return StreamingResponse(self.events(job, work), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})  # fmt: skip

    async def events(self, job, work):
        """progress events, then completed (the non-stream answer) or error; a client that goes
        away (Starlette cancels this generator) cancels the job."""
        finished = False
        try:
            while True:
                get = asyncio.ensure_future(job.events.get())
                left = max(0.0, job.deadline - time.monotonic())
                done, _ = await asyncio.wait({get, job.future}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    yield _sse("progress", get.result()[1])
                    continue
                get.cancel()
                while not job.events.empty():
                    yield _sse("progress", job.events.get_nowait()[1])
                if job.future in done:
                    try:
                        body = self.answer(work, job.future.result())
                    except ApiError as e:
                        self.metrics.error(e.status)
                        body, event = e.body(), "error"
                    else:
                        event = "completed"
                else:
                    job.cancel()
                    self.metrics.error(504)
                    body = ApiError(504, f"the request took longer than {self.config.timeout_s} s", "timeout").body()
                    event = "error"
                finished = True
                yield _sse(event, body)
                return
        finally:
            if not finished:
                job.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def create_app(config: ServeConfig, pipe=None) -> FastAPI:
    """The app of ``config``: ``pipe`` given (tests, Ray replicas) is served as is (LoRAs and
    --compile applied to it); None loads ``config.model`` on the worker thread while /health
    answers 503 {"status": "loading"}."""
    server = Server(config, pipe)

    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        server.engine.stop_accepting()
        await asyncio.to_thread(server.engine.stop)  # finishes what is queued

    app = FastAPI(title="fastflow serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        server.metrics.error(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return await api_error(request, ApiError(e.status_code, str(e.detail), "not_found" if e.status_code == 404
                                                 else None, dict(e.headers or {})))  # fmt: skip

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.error("fastflow serve: internal error", exc_info=e)
        return await api_error(request, ApiError(500, f"internal error ({type(e).__name__})", "internal_error"))

    @app.get("/health")
    async def health():
        engine = server.engine
        if not engine.accepting:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        if engine.failed:
            return JSONResponse({"status": "error", "message": engine.failed}, status_code=503)
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": server.info.name, "queued": engine.queued()}

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_key(request)
        server.check_ready()
        return {"object": "list", "data": [{**server.info.describe(), "created": server.created,
                                            "loras": server.loras.names()}]}  # fmt: skip

    @app.get("/metrics")
    async def metrics(request: Request):
        server.check_key(request)
        server.metrics.queue_depth(server.engine.queued())
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/")
    async def page():
        if not PAGE.is_file():
            raise ApiError(404, "this installation has no web page (fastflow/serve/static/index.html)", "not_found")
        return Response(PAGE.read_bytes(), media_type="text/html; charset=utf-8")

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        server.check_key(request)
        server.check_ready()
        body = await server.read_body(request)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON", "invalid_json") from None
        work = parse_generation(payload, server.info, server.limits, server.loras.resolve)
        return await server.generate(work, request)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        from .edits import parse_edit

        server.check_key(request)
        server.check_ready()
        await server.read_body(request)
        work = await parse_edit(request, server.info, server.limits, server.loras.resolve)
        return await server.generate(work, request)

    return app
