"""The HTTP application (Starlette): OpenAI-style /v1/completions and /v1/models, the verse forms
(/v1/forms), /health, and the web page.

Requests are parsed and answered on the asyncio loop; the token work happens on each model's
engine thread (engine.py), whose text comes back through `loop.call_soon_threadsafe`, once per
step for all the streams it advanced.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from typing import Any, Callable, Iterable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rnngen.compose import MAX_CANDIDATES
from rnngen.config import DEFAULT_CANDIDATES
from rnngen.errors import UsageError
from rnngen.forms import FORMS
from rnngen.layout import CONFIG_FILE, INDEX_FILE
from rnngen.serving import protocol
from rnngen.serving.engine import Closed, Engine, Event, Stream
from rnngen.serving.protocol import ApiError, Completion, Limits

WEB_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
             "/style.css": ("style.css", "text/css; charset=utf-8")}
PAGE_HEADERS = {"cache-control": "no-cache", "x-content-type-options": "nosniff",
                "content-security-policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"}
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass
class Served:
    """A model as the server offers it."""

    name: str
    engine: Engine
    created: int  # when its config.json was written (the protocol's `created`)
    streams: int = 0  # stream slots held by the requests in flight (see reserve)

    def reserve(self, count: int, limit: int) -> Callable[[], None]:
        """Hold `count` stream slots, or 429; returns the call that gives them back (once).

        Called on the loop before any await, so requests that arrive together cannot all see room."""
        if self.streams + count > limit:
            raise ApiError(429, f"the server is generating {limit} streams already; try again shortly",
                           type="rate_limit_error", code="server_busy")
        self.streams += count
        held = [count]

        def release() -> None:
            self.streams -= held[0]
            held[0] = 0

        return release

    def card(self) -> dict[str, Any]:
        loaded = self.engine.loaded
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "rnngen",
                "rnngen": {"tokenizer": loaded.tokenizer.kind, "vocab_size": loaded.tokenizer.vocab_size,
                           "song_memory": self.engine.mixture is not None,
                           "copy_check": (loaded.directory / INDEX_FILE).is_file()}}


def create_app(engines: list[Engine], limits: Limits, api_key: str | None = None,
               write_log: Callable[[str], None] | None = None, hosts: Iterable[str] = ()) -> Any:
    """The ASGI application serving `engines` (the first is the default model).

    `hosts`: the names a request's Host header may give besides localhost and IP addresses ("*": any)."""
    models = {e.name: Served(e.name, e, _created(e)) for e in engines}
    default = engines[0].name
    state = {"stopping": False}
    sinks: dict[asyncio.AbstractEventLoop, _Sink] = {}

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "stopping" if state["stopping"] else "ok", "models": list(models),
                             "streams": sum(m.engine.active for m in models.values()),
                             "waiting": sum(m.engine.waiting for m in models.values())})

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [m.card() for m in models.values()]})

    async def get_model(request: Request) -> Response:
        return JSONResponse(_served(models, request.path_params["name"]).card())

    async def completions(request: Request) -> Response:
        _json_only(request)
        data = protocol.parse_json(await _body(request, limits.max_body, limits.request_timeout))
        comp = protocol.parse_completion(data, limits)
        served = _served(models, comp.model or default)
        request.state.model = served.name
        engine = served.engine
        release = served.reserve(len(comp.prompts) * comp.n, limits.max_streams)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        sink = sinks.get(loop) or sinks.setdefault(loop, _Sink(loop))  # one per loop: one wake-up per step
        try:
            streams = await run_in_threadpool(_open, engine, comp, sink, queue)
            engine.submit(streams)
        except Closed:
            release()
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
        except BaseException:  # a bad request, a cancelled task: the slots were never used
            release()
            raise
        reply = _Reply(served.name, comp, streams, queue, request.state, release)
        return reply.events if comp.stream else await reply.whole(request)

    async def list_forms(request: Request) -> Response:
        return JSONResponse(_forms())

    async def page(request: Request) -> Response:
        name, kind = WEB_FILES[request.url.path]
        body = resources.files("rnngen").joinpath("web", name).read_bytes()
        return Response(body, media_type=kind, headers=PAGE_HEADERS)

    routes = [Route(path, page, methods=["GET", "HEAD"]) for path in WEB_FILES]
    routes += [Route("/health", health, methods=["GET", "HEAD"]),
               Route("/v1/models", list_models, methods=["GET"]),
               Route("/v1/models/{name:path}", get_model, methods=["GET"]),
               Route("/v1/forms", list_forms, methods=["GET"]),
               Route("/v1/completions", completions, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                                                        Exception: _server_error})
    wrapped = _AccessLog(_HostCheck(_Auth(app, api_key) if api_key else app, hosts), write_log or _stderr)
    wrapped.flags = state  # the server sets "stopping" on a stop signal (shown by /health)
    return wrapped


@lru_cache(maxsize=1)
def _forms() -> dict[str, Any]:
    """GET /v1/forms: every verse form a request's `form` may name, with its pattern as `rnngen forms
    NAME` shows it, and the `candidates` a form gets by default."""
    data = [{"name": f.name, "aliases": list(f.aliases), "kind": f.kind, "clauses": f.clause_count,
             "characters": f.characters, "rhyme_book": f.default_book, "pattern": f.describe()}
            for f in FORMS.values()]
    return {"object": "list", "data": data, "default_candidates": DEFAULT_CANDIDATES,
            "max_candidates": MAX_CANDIDATES}


def _created(engine: Engine) -> int:
    try:
        return int((engine.loaded.directory / CONFIG_FILE).stat().st_mtime)
    except OSError:
        return 0


def _served(models: dict[str, Served], name: str) -> Served:
    if name not in models:
        raise ApiError(404, f"The model {name!r} does not exist on this server (it has: {', '.join(models)})",
                       param="model", code="model_not_found")
    return models[name]


def _json_only(request: Request) -> None:
    """POST bodies must say they are JSON: a web page on any site may send text/plain or a form without
    asking first, while application/json needs a CORS preflight, which this server never grants."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/json":
        got = f" (got {kind[:60]!r})" if kind else ""
        raise ApiError(415, f"send the body as JSON with the header 'Content-Type: application/json'{got}",
                       code="unsupported_media_type")


async def _body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body: 413 beyond `limit` bytes, 408 if it takes over `timeout` seconds, 499 if the client leaves."""
    try:
        return await asyncio.wait_for(_read(request, limit), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} seconds",
                       code="request_timeout") from None
    except ClientDisconnect:  # nobody reads the answer; the access log shows 499
        raise ApiError(499, "the client closed the connection while sending the body", code="client_closed") from None


async def _read(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "Content-Length is not a number", code="invalid_request")
        if int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes; this server takes at most {limit}",
                           code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes, the most this server takes",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _open(engine: Engine, comp: Completion, sink: "_Sink", queue: asyncio.Queue) -> list[Stream]:
    """Build and check every choice's stream (on a worker thread: the first copy check loads an index)."""
    requests = protocol.sample_requests(comp, engine.model)
    try:
        songs: dict = {}  # the request's choices share their prompt's song memory
        return [engine.open(r, comp.stops, sink, tag=(queue, i), songs=songs) for i, r in enumerate(requests)]
    except UsageError as exc:  # the model's own checks (an acrostic character it never saw, ...)
        raise protocol.from_usage(exc) from None


class _Sink:
    """Hands an engine step's events to the asyncio loop: one wake-up per step, not per stream."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def __call__(self, events: list[Event]) -> None:
        self.loop.call_soon_threadsafe(_deliver, events)


def _deliver(events: list[Event]) -> None:
    for stream, text, finish in events:
        queue, index = stream.tag
        queue.put_nowait((index, text, finish))


class _Reply:
    """Collects one request's streams into a response: whole (JSON) or as server-sent events."""

    def __init__(self, model: str, comp: Completion, streams: list[Stream], queue: asyncio.Queue, state: Any,
                 release: Callable[[], None]):
        self.model, self.comp, self.streams, self.queue, self.state = model, comp, streams, queue, state
        self.release = release  # gives the streams' slots back when the reply ends
        self.id, self.created = protocol.completion_id(), protocol.now()
        self.chars = state.chars = 0  # (state: the request's, which the access log reads)
        self.gone = False  # the client left
        # each event is protocol.completion(...) with one choice; its constant parts are encoded once
        head = _sse(protocol.completion(self.id, self.created, model, [protocol.choice(0, "", None)], None))
        self._head, self._tail = head.split(b'"text":""', 1)
        self._tail = self._tail.replace(b'"index":0', b'"index":%d').replace(b'"finish_reason":null',
                                                                            b'"finish_reason":%s')

    def _chunk(self, index: int, text: str, finish: str | None) -> bytes:
        """_sse(protocol.completion(..., [protocol.choice(index, text, finish)], None)), faster."""
        return (self._head + b'"text":' + json.dumps(text, ensure_ascii=False).encode("utf-8")
                + self._tail % (index, json.dumps(finish).encode()))

    def cancel(self) -> None:
        self.gone = True
        for s in self.streams:
            s.cancel()
        self.queue.put_nowait(None)

    async def _watch(self, receive) -> None:
        """Cancel the streams as soon as the client goes away."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.cancel()
                return

    async def _pieces(self):
        """Yield {index: (text, finish)} for whatever has arrived, until every stream has finished."""
        left = len(self.streams)
        while left:
            item = await self.queue.get()
            got: dict[int, list] = {}
            while True:
                if item is None:  # the client left
                    return
                index, text, finish = item
                entry = got.setdefault(index, ["", None])
                entry[0] += text
                if finish is not None:
                    entry[1] = finish
                    left -= 1
                if self.queue.empty():
                    break
                item = self.queue.get_nowait()
            for text, _ in got.values():
                self.chars += len(text)
            self.state.chars = self.chars
            yield got

    def _usage(self) -> dict[str, int]:
        n = self.comp.n
        prompt = sum(s.prompt_tokens for s in self.streams[::n])
        return protocol.usage(prompt, sum(s.steps for s in self.streams))

    async def whole(self, request: Request) -> Response:
        watcher = asyncio.ensure_future(self._watch(request.receive))
        texts = [s.request.seed_text if self.comp.echo else "" for s in self.streams]
        finish: list[str | None] = [None] * len(self.streams)
        try:
            async for got in self._pieces():
                for index, (text, reason) in got.items():
                    texts[index] += text
                    finish[index] = reason or finish[index]
        finally:
            watcher.cancel()
            for s in self.streams:
                s.cancel()
            self.release()
        if self.gone or any(f is None for f in finish):  # the client left: nobody reads this
            return Response(status_code=499)
        if "error" in finish:
            raise RuntimeError("generation failed (see the server's log)")
        choices = [protocol.choice(i, t, f) for i, (t, f) in enumerate(zip(texts, finish))]
        return JSONResponse(protocol.completion(self.id, self.created, self.model, choices, self._usage()))

    async def events(self, scope, receive, send) -> None:
        """The response as server-sent events, ending with `data: [DONE]` (an ASGI app)."""
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                *[(k.encode(), v.encode()) for k, v in SSE_HEADERS.items()]]})
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            if self.comp.echo:
                await self._send(send, {i: (s.request.seed_text, None) for i, s in enumerate(self.streams) if s.request.seed_text})
            async for got in self._pieces():
                if "error" in (f for _, f in got.values()):
                    error = ApiError(500, "generation failed (see the server's log)", type="server_error")
                    await send({"type": "http.response.body", "body": _sse(error.body()), "more_body": True})
                await self._send(send, got)
            if self.gone:
                return
            tail = b""
            if self.comp.include_usage:
                tail = _sse(protocol.completion(self.id, self.created, self.model, [], self._usage()))
            await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"})
        except OSError:  # the client went away while we wrote
            pass
        finally:
            watcher.cancel()
            for s in self.streams:
                s.cancel()
            self.release()

    async def _send(self, send, got: dict[int, tuple]) -> None:
        body = b"".join(self._chunk(i, text, finish) for i, (text, finish) in sorted(got.items()))
        if body:
            await send({"type": "http.response.body", "body": body, "more_body": True})


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


# ---- errors, keys and the access log ---------------------------------------------------------------


async def _api_error(request: Request, exc: ApiError) -> Response:
    close = {"connection": "close"} if exc.status == 408 else None  # the rest of a slow body is not awaited
    return JSONResponse(exc.body(), status_code=exc.status, headers=close)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {404: f"no such endpoint: {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return JSONResponse(ApiError(exc.status_code, message, code=codes.get(exc.status_code)).body(),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _server_error(request: Request, exc: Exception) -> Response:
    # a bug: the client gets the error object, the traceback goes to the server's log (uvicorn prints it)
    return JSONResponse(ApiError(500, "internal server error (see the server's log)", type="server_error").body(),
                        status_code=500)


class _Auth:
    """With an API key, every /v1/ request needs `Authorization: Bearer KEY` (the page and /health stay open)."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode("utf-8")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                message = ("Incorrect API key provided" if token else
                           "this server needs an API key: send the header 'Authorization: Bearer KEY'")
                error = ApiError(401, message, code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401,
                                   headers={"www-authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _HostCheck:
    """Answer only requests whose Host header names this server: localhost, an IP address, or one of `names`.

    A web page can point its own DNS name at 127.0.0.1 (DNS rebinding) and then read this server's
    replies as its own; its requests still carry its name in Host, and are refused (421)."""

    def __init__(self, app, names: Iterable[str]):
        self.app, self.names = app, {host_name(n) for n in names} | {"localhost"}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and "*" not in self.names:
            for header, value in scope["headers"]:
                name = host_name(value.decode("latin-1")) if header == b"host" else None
                if name is not None and name not in self.names and not _is_ip(name):
                    shown = name[:100]
                    error = ApiError(421, f"this server does not answer to the name {shown!r} (the Host header); "
                                          f"start it with --allowed-host {shown} to allow it", code="invalid_host")
                    await JSONResponse(error.body(), status_code=421)(scope, receive, send)
                    return
        await self.app(scope, receive, send)  # no Host at all (HTTP/1.0): not a browser, let it through


def host_name(host: str) -> str:
    """The name in a Host header or an --allowed-host: 'Example.com:8000' -> 'example.com', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    """An address can name only the machine it belongs to: no page can rebind it."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class _AccessLog:
    """One JSON line per request on stderr: time, client, method, path, status, duration, model, characters."""

    def __init__(self, app, write: Callable[[str], None]):
        self.app, self.write = app, write

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [0]
        state = scope.setdefault("state", {})

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client")
            record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                      "client": f"{client[0]}:{client[1]}" if client else None, "method": scope["method"],
                      "path": scope["path"], "status": status[0] or 500,
                      "duration_ms": round((time.perf_counter() - start) * 1000, 1),
                      "model": state.get("model"), "chars": state.get("chars")}
            self.write(json.dumps(record, ensure_ascii=False))


def _stderr(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: the log is lost, serving goes on
        pass
