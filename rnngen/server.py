"""`rnngen serve`: load the models, start their batching engines, and serve them over HTTP (uvicorn).

The application itself is rnngen/serving/app.py; the engine that batches concurrent streams is
rnngen/serving/engine.py. Ctrl-C or SIGTERM ends every stream in flight (each gets its last event
and `data: [DONE]`), closes the server, and exits 130 / 143.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys

from rnngen.errors import RnngenError, UsageError
from rnngen.serving.protocol import Limits

SHUTDOWN_GRACE = 5.0  # seconds the in-flight responses get to finish after a stop signal


def run(models: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        limits: Limits | None = None, threads: int = 1) -> int:
    """Serve until Ctrl-C or SIGTERM; returns the exit code (0, or 128 + the signal's number)."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise UsageError(f"rnngen serve needs the serve extra ({exc.name} is missing): "
                         "pip install 'rnngen[serve]'") from None
    import torch

    from rnngen.config import check_range
    from rnngen.serving.app import create_app
    from rnngen.serving.engine import Engine

    limits = limits or Limits()
    limits.validate()
    check_range("--port", port, 0, 65535, integer=True)
    check_range("--threads", threads, 0, 4096, integer=True)
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty; give a key or leave the option out")
    if threads:  # one thread steps the batch best on a few shared cores: the HTTP loop needs one too
        torch.set_num_threads(threads)
    try:
        loaded = load_models(models)
    except KeyboardInterrupt:  # Ctrl-C while loading: nothing to clean up
        return 128 + signal.SIGINT
    sock = _listen(host, port)
    engines = [Engine(m) for m in loaded.values()]
    app = create_app(engines, limits, api_key)
    log = logging.getLogger("rnngen.server")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    config = uvicorn.Config(app, access_log=False, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=SHUTDOWN_GRACE)
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
