"""`rnngen serve`: load the models, start their batching engines, and serve them over HTTP (uvicorn).

The application itself is rnngen/serving/app.py; the engine that batches concurrent streams is
rnngen/serving/engine.py. Ctrl-C or SIGTERM ends every stream in flight (each gets its last event
and `data: [DONE]`), closes the server, and exits 130 / 143. Connections that send nothing or send
their headers too slowly are closed here (uvicorn has no header timeout); proxy headers are trusted
only from --forwarded-allow-ips.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys

from rnngen.errors import RnngenError, UsageError
from rnngen.serving.protocol import Limits

SHUTDOWN_GRACE = 5.0  # seconds the in-flight responses get to finish after a stop signal


def run(models: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        limits: Limits | None = None, threads: int = 1, allowed_hosts: list[str] | tuple = (),
        forwarded_allow_ips: str | None = None) -> int:
    """Serve until Ctrl-C or SIGTERM; returns the exit code (0, or 128 + the signal's number).

    `allowed_hosts`: names the Host header may give besides localhost, IP addresses and `host` ("*": any).
    `forwarded_allow_ips`: proxies (addresses, networks, "*") whose X-Forwarded-For/-Proto are believed."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise UsageError(f"rnngen serve needs the serve extra ({exc.name} is missing): "
                         "pip install 'rnngen[serve]'") from None
    import torch

    from rnngen.config import check_range
    from rnngen.serving.app import create_app, host_name
    from rnngen.serving.engine import Engine

    limits = limits or Limits()
    limits.validate()
    check_range("--port", port, 0, 65535, integer=True)
    check_range("--threads", threads, 0, 4096, integer=True)
    if api_key is not None:
        api_key = api_key.strip()  # a client's token is stripped too: padded, the key could never match
        if not api_key:
            raise UsageError("the API key (--api-key or RNNGEN_API_KEY) is empty; give a key, or leave both unset "
                             "for a server without one")
    for name in allowed_hosts:
        if name.strip() != "*" and not _is_host(host_name(name)):
            raise UsageError(f"--allowed-host {name!r} is not a host name; give one such as songs.example, "
                             "or '*' for any")
    trusted = _proxies(forwarded_allow_ips)
    if threads:  # one thread steps the batch best on a few shared cores: the HTTP loop needs one too
        torch.set_num_threads(threads)
    try:
        loaded = load_models(models)
    except KeyboardInterrupt:  # Ctrl-C while loading: nothing to clean up
        return 128 + signal.SIGINT
    sock = _listen(host, port)
    engines = [Engine(m) for m in loaded.values()]
    app = create_app(engines, limits, api_key, hosts=[host, *(n.strip() for n in allowed_hosts)])
    log = logging.getLogger("rnngen.server")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    # uvicorn believes X-Forwarded-For from 127.0.0.1 unless told otherwise: any local program could pose as anyone
    config = uvicorn.Config(app, access_log=False, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=SHUTDOWN_GRACE, http=_protocol(limits.request_timeout),
                            proxy_headers=bool(trusted), forwarded_allow_ips=trusted or [])
    server = _server(uvicorn, config, engines, app.flags)
    where = sock.getsockname()
    shown = f"[{where[0]}]" if sock.family == socket.AF_INET6 else where[0]
    sys.stderr.write(f"rnngen serve: {', '.join(loaded)} on http://{shown}:{where[1]}/ (Ctrl-C stops)\n")
    sys.stderr.flush()
    try:
        server.run(sockets=[sock])
    finally:
        for engine in engines:
            engine.close(wait=SHUTDOWN_GRACE)
        sock.close()
    return 128 + server.stopped_by if server.stopped_by else 0


def load_models(specs: list[str]) -> dict:
    """name -> rnngen.Model for each --model (default: the one `rnngen sample` would use).

    On the CPU in float32: the engine's batched step then gives each stream the same numbers
    whatever else is in the batch (see serving/engine.py)."""
    import rnngen

    loaded = {}
    for spec in specs or [None]:
        model = rnngen.load(spec, device="cpu", precision="fp32")
        name = model.name
        if name in loaded:
            raise UsageError(f"two models are named {name!r}; serve models from directories with different names")
        loaded[name] = model
    return loaded


def _is_host(name: str) -> bool:
    return bool(name) and not any(c.isspace() or c in "/@,?#[]" for c in name)


def _proxies(value: str | None) -> list[str]:
    """--forwarded-allow-ips: comma-separated addresses or networks, or "*" (any); none: trust no proxy."""
    items = [item.strip() for item in (value or "").split(",") if item.strip()]
    for item in items:
        try:
            if item != "*":
                ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise UsageError(f"--forwarded-allow-ips: {item!r} is not an IP address or network "
                             "(give e.g. 127.0.0.1,10.0.0.0/8, or '*')") from None
    return items


def _protocol(timeout: float):
    """uvicorn's HTTP protocol with a deadline for each request's headers: `timeout` seconds from the
    connection (or the previous response) until the headers are complete, else the connection is closed.
    uvicorn has none, so a client that sends nothing, or a header a byte at a time, held its connection
    for ever. The body's deadline is the application's (serving/app.py answers 408)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class Protocol(AutoHTTPProtocol):
        headers_due = None  # the timer for the request whose headers are awaited

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.cycle.response_complete:  # nothing pipelined waits
                self._await_headers()  # so the next request's headers are due

        def connection_lost(self, exc) -> None:
            if self.headers_due is not None:
                self.headers_due.cancel()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            if self.headers_due is not None:
                self.headers_due.cancel()
            last = self.cycle  # the protocol makes a new cycle once a request's headers are complete

            def check() -> None:
                if self.cycle is last and not self.transport.is_closing():
                    self.transport.close()

            self.headers_due = self.loop.call_later(timeout, check)

    return Protocol


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or one line saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                            flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise UsageError(f"cannot listen on {host!r}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        if os.name != "nt":  # on Windows SO_REUSEADDR would let another server take the same port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise RnngenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port") from None
    return sock


def _server(uvicorn, config, engines, flags: dict):
    """uvicorn's server, except that a stop signal first ends the streams in flight and sets the exit code
    (uvicorn would raise the signal again once shut down, and the process would die by it)."""

    class Server(uvicorn.Server):
        stopped_by = 0  # the first stop signal's number

        def handle_exit(self, sig: int, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for responses
                return
            self.stopped_by = self.stopped_by or sig
            flags["stopping"] = True
            for engine in engines:
                engine.close("length")  # every stream ends now, with its last event and [DONE]
            self.should_exit = True

    return Server(config)
