"""rnngen serve against hostile or careless clients: web pages, rebinding, slow sockets, odd text, a flood.

Each test drives a real server subprocess (test_serve.Server) on a free loopback port."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from conftest import LINES, make_songs  # noqa: E402
from test_serve import Server  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from rnngen.cli import app  # noqa: E402

TIMEOUT = 1  # --request-timeout for the servers here: slow clients are dropped within a second or two


@pytest.fixture(scope="module")
def server(trained_dir, tmp_path_factory):
    """A keyless server, the kind a web page could reach."""
    s = Server(trained_dir, tmp_path_factory.mktemp("hardening"), "--allowed-host", "songs.example",
               "--max-tokens", "100000", "--request-timeout", str(TIMEOUT))
    yield s
    assert s.stop() == 130
    assert "Traceback" not in s.stderr() and "ClientDisconnect" not in s.stderr()


def records(server: Server) -> list[dict]:
    """The access log so far (one JSON object per request)."""
    return [json.loads(line) for line in server.stderr().splitlines() if line.startswith("{")]


def new_record(server: Server, before: int) -> dict:
    """The one access-log line written after the first `before` (it comes as the response ends)."""
    deadline = time.monotonic() + 5
    while len(records(server)) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    [record] = records(server)[before:]
    return record


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert error["message"] and "\n" not in error["message"]
    return error


def port(server: Server) -> str:
    return server.url.rsplit(":", 1)[1]


# ---- 2. Host header and JSON-only POST: no web page can drive the server ------------------------------

GOOD_HOSTS = ["127.0.0.1:{port}", "127.0.0.1", "localhost", "localhost:{port}", "LocalHost:{port}", "[::1]:{port}",
              "[::1]", "songs.example", "Songs.Example:8443", "10.1.2.3:80"]
BAD_HOSTS = ["rebind.attacker.example", "rebind.attacker.example:{port}", "localhost.attacker.example",
             "127.0.0.1.attacker.example:{port}", "songs.example.attacker.example"]


def test_host_header_is_checked(server):
    for host in GOOD_HOSTS:
        host = host.format(port=port(server))
        assert httpx.get(server.url + "/v1/models", headers={"Host": host}, timeout=10).status_code == 200, host
    for host in BAD_HOSTS:
        host = host.format(port=port(server))
        for method, path in [("GET", "/v1/models"), ("GET", "/health"), ("GET", "/"), ("POST", "/v1/completions")]:
            response = httpx.request(method, server.url + path, headers={"Host": host},
                                     json={"prompt": "春", "max_tokens": 3}, timeout=10)
            error = assert_error(response, 421, "invalid_host")
            assert "--allowed-host" in error["message"], error
    assert [r["status"] for r in records(server) if r["path"] == "/health"][-1] == 421  # rejections are logged


CONTENT_TYPES = [(None, 415), ("text/plain", 415), ("text/plain; charset=utf-8", 415),
                 ("application/x-www-form-urlencoded", 415), ("multipart/form-data", 415), ("application/json", 200),
                 ("Application/JSON; charset=UTF-8", 200)]


@pytest.mark.parametrize("content_type,status", CONTENT_TYPES)
def test_post_bodies_must_be_json(server, content_type, status):
    """A page on any site can POST text/plain without asking first (no CORS preflight); JSON needs one."""
    headers = {"Content-Type": content_type} if content_type else {}
    response = httpx.post(server.url + "/v1/completions", content=json.dumps({"prompt": "春", "max_tokens": 3}),
                          headers=headers, timeout=30)
    if status == 200:
        assert response.status_code == 200, response.text
    else:
        assert "application/json" in assert_error(response, 415, "unsupported_media_type")["message"]


# ---- 3. an empty or padded API key -------------------------------------------------------------------


def start_refused(trained_dir, tmp_path, flags: list[str], env: dict[str, str]) -> str:
    """Start `rnngen serve` expecting a refusal; returns its stderr."""
    command = [sys.executable, "-m", "rnngen", "serve", "--model", str(trained_dir), "--port", "0", *flags]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the server started:\n{err}")
    assert proc.returncode != 0 and out == "", err
    return err


@pytest.mark.parametrize("flags,env", [([], {"RNNGEN_API_KEY": ""}), ([], {"RNNGEN_API_KEY": "   "}),
                                       (["--api-key", ""], {}), (["--api-key", "   "], {}),
                                       (["--forwarded-allow-ips", "not-an-address"], {}),
                                       (["--allowed-host", ""], {}), (["--request-timeout", "0"], {})],
                         ids=["empty-env", "blank-env", "empty-option", "blank-option", "bad-forwarded", "bad-host",
                              "zero-timeout"])
def test_bad_settings_refuse_to_start(trained_dir, tmp_path, monkeypatch, flags, env):
    monkeypatch.delenv("RNNGEN_API_KEY", raising=False)
    err = start_refused(trained_dir, tmp_path, flags, env)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in err, err


def test_key_with_surrounding_spaces_is_stripped(trained_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RNNGEN_API_KEY", "  padded-key \t")
    s = Server(trained_dir, tmp_path)
    try:
        assert s.post({"prompt": "a", "max_tokens": 3}, key="padded-key").status_code == 200
        assert s.post({"prompt": "a", "max_tokens": 3}, key="other").status_code == 401
        assert s.post({"prompt": "a", "max_tokens": 3}, key=None).status_code == 401
    finally:
        s.stop()


# ---- 4. --max-streams holds when requests arrive together ---------------------------------------------


def test_max_streams_holds_under_concurrent_requests(trained_dir, tmp_path):
    s = Server(trained_dir, tmp_path, "--max-streams", "2", "--max-tokens", "100000")
    clients = 20
    statuses: list[int] = []
    all_answered = threading.Barrier(clients + 1)
    body = {"prompt": "春", "max_tokens": 100000, "stream": True}

    def one() -> None:
        try:
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as response:
                statuses.append(response.status_code)
                all_answered.wait(60)  # the streams that got in keep their slots until everyone has an answer
        except Exception:
            statuses.append(-1)
            all_answered.abort()

    try:
        threads = [threading.Thread(target=one) for _ in range(clients)]
        for t in threads:
            t.start()
        all_answered.wait(60)
        for t in threads:
            t.join()
        assert sorted(statuses) == [200] * 2 + [429] * (clients - 2), statuses
        deadline = time.monotonic() + 10  # the two streams end when their clients leave: the slots come back
        while s.health()["streams"] and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(3):  # streams that fail to open give their slots back too
            assert s.post({"prompt": "", "acrostic": "龘", "n": 2, "max_tokens": 5}).status_code == 400
        assert s.post({"prompt": "春", "n": 2, "max_tokens": 5}).status_code == 200
    finally:
        s.stop()
    assert "Traceback" not in s.stderr()


# ---- 6. slow and vanishing clients -------------------------------------------------------------------


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host.strip("[]"), int(port)), timeout=10)


def wait_closed(socks: dict[str, socket.socket], within: float, trickle: set[str] = frozenset()) -> dict[str, float]:
    """Seconds until the server closed each socket (those in `trickle` send a byte every 0.2 s meanwhile)."""
    start, closed = time.monotonic(), {}
    while len(closed) < len(socks) and time.monotonic() - start < within:
        for name, sock in socks.items():
            if name in closed:
                continue
            try:
                if name in trickle:
                    sock.send(b"X")
                if select.select([sock], [], [], 0)[0] and not sock.recv(4096):
                    closed[name] = time.monotonic() - start
            except OSError:  # reset by the server
                closed[name] = time.monotonic() - start
        time.sleep(0.2)
    return closed


def test_silent_and_slow_connections_are_closed(server):
    socks = {f"silent{i}": connect(server) for i in range(4)}
    for i in range(3):
        socks[f"partial{i}"] = connect(server)
        socks[f"partial{i}"].sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    for i in range(3):  # a header that keeps coming, a byte at a time, is cut off all the same
        socks[f"trickle{i}"] = connect(server)
        socks[f"trickle{i}"].sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    try:
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # the server keeps serving meanwhile
        closed = wait_closed(socks, within=TIMEOUT + 4, trickle={n for n in socks if n.startswith("trickle")})
        assert set(closed) == set(socks), closed
    finally:
        for sock in socks.values():
            sock.close()


def test_slow_body_gets_408_and_is_closed(server):
    before = len(records(server))
    sock = connect(server)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n" + b'{"prompt": "' + b"a" * 18)
        sock.settimeout(TIMEOUT + 5)
        reply = b""
        while chunk := sock.recv(4096):  # the server answers, then closes
            reply += chunk
    finally:
        sock.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert json.loads(body)["error"]["code"] == "request_timeout"
    record = new_record(server, before)
    assert record["status"] == 408 and record["path"] == "/v1/completions"


def test_dropped_upload_is_one_499_line(server):
    before = len(records(server))
    sock = connect(server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n" + b"x" * 30)
    time.sleep(0.2)
    sock.close()
    record = new_record(server, before)
    assert record["status"] == 499 and record["path"] == "/v1/completions"
    assert "Traceback" not in server.stderr() and "ClientDisconnect" not in server.stderr()


# ---- 7. proxy headers only from trusted proxies --------------------------------------------------------


def test_forwarded_headers_are_ignored_by_default(server):
    before = len(records(server))
    httpx.get(server.url + "/health", headers={"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"}, timeout=10)
    assert new_record(server, before)["client"].startswith("127.0.0.1:")


def test_forwarded_headers_from_a_trusted_proxy(trained_dir, tmp_path):
    s = Server(trained_dir, tmp_path, "--forwarded-allow-ips", "127.0.0.1,::1")
    try:
        before = len(records(s))
        httpx.get(s.url + "/health", headers={"X-Forwarded-For": "6.6.6.6"}, timeout=10)
        assert new_record(s, before)["client"].startswith("6.6.6.6:")
    finally:
        s.stop()


# ---- 8. text that is not Unicode -----------------------------------------------------------------------

SURROGATES = [
    ('{"prompt": "\\ud800", "echo": true, "max_tokens": 3}', "prompt"),
    ('{"prompt": "\\ud800", "echo": true, "max_tokens": 3, "stream": true}', "prompt"),
    ('{"prompt": "a\\udfffb", "max_tokens": 3, "stream": true}', "prompt"),
    ('{"prompt": ["a", "\\ud800"], "max_tokens": 3}', "prompt"),
    ('{"n": "\\ud800"}', "n"),
    ('{"model": "\\ud800"}', "model"),
    ('{"stop": ["\\udc00"], "stream": true}', "stop"),
    ('{"stream_options": {"\\ud800": true}, "stream": true}', "stream_options"),
    ('{"\\ud800": 1}', None),
    ('{"prompt": "\\ude00\\ud83d"}', "prompt"),  # a pair in the wrong order is two lone halves
]


@pytest.mark.parametrize("body,param", SURROGATES, ids=[str(i) for i in range(len(SURROGATES))])
def test_lone_surrogates_are_a_400(server, body, param):
    response = httpx.post(server.url + "/v1/completions", content=body,
                          headers={"Content-Type": "application/json"}, timeout=30)
    error = assert_error(response, 400, "invalid_unicode")
    assert error["param"] == param and "Unicode" in error["message"]
    assert "Traceback" not in server.stderr()


@pytest.mark.parametrize("stream", [False, True])
def test_a_surrogate_pair_is_a_character(server, stream):
    body = '{"prompt": "\\ud83c\\udf19", "echo": true, "max_tokens": 3, "stream": %s}' % json.dumps(stream)
    response = httpx.post(server.url + "/v1/completions", content=body,
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 200, response.text
    assert "\U0001f319" in response.text or "\\ud83c\\udf19" in response.text
    if stream:
        assert response.text.rstrip().endswith("data: [DONE]")


def test_serve_help_lists_the_new_options(runner):
    from rnngen.cli import app

    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--allowed-host", "--forwarded-allow-ips", "--request-timeout"):
        assert option in result.stdout


# ---- 5. a long prompt does not stall the streams already running -------------------------------------


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """A char LSTM wider than the session's tiny one (hidden 256), trained 2 steps: reading a
    4,000-character prompt takes it about 0.2 s, a running stream's step a millisecond or two."""
    root = tmp_path_factory.mktemp("wide")
    corpus = root / "songs.txt"
    corpus.write_text(make_songs(), encoding="utf-8")
    out = root / "model"
    result = CliRunner().invoke(app, ["train", str(corpus), "--out", str(out), "--max-steps", "2", "--hidden-size",
                                      "256", "--embedding-dim", "64", "--batch-size", "4", "--seq-len", "16",
                                      "--eval-every", "2", "--warmup-steps", "1", "--threads", "1", "-q"])
    assert result.exit_code == 0, result.stderr
    return out


def test_a_long_prompt_does_not_stall_a_running_stream(wide_dir, tmp_path):
    """Issue 20 item 5: a request with a 4,000-character prompt and n 16 (the default limits) joins a
    running stream. Read all at once, that stream waits for the whole prompt reading; read in chunks
    between steps, its worst wait is one step, a small part of the time the joining request takes to
    its first character."""
    s = Server(wide_dir, tmp_path, "--max-tokens", "100000", "--max-prompt", "4000", "--max-n", "16")
    arrivals: list[float] = []  # when each of the running stream's events came
    under_way, leave = threading.Event(), threading.Event()
    failed: list[Exception] = []

    def running() -> None:
        body = {"prompt": "春", "max_tokens": 100000, "stream": True, "seed": 1}
        try:
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        arrivals.append(time.perf_counter())
                    if len(arrivals) >= 100:
                        under_way.set()
                    if leave.is_set():
                        return
        except Exception as exc:  # reported by the test below
            failed.append(exc)

    thread = threading.Thread(target=running)
    try:
        thread.start()
        assert under_way.wait(30), "the running stream did not get going"
        prompt = ("".join(LINES) * 200)[:4000]
        body = {"prompt": prompt, "n": 16, "max_tokens": 5, "stream": True, "seed": 2}
        joined, first = time.perf_counter(), None
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if first is None and line.startswith("data: ") and line != "data: [DONE]":
                    first = time.perf_counter()
        ended, seen = time.perf_counter(), len(arrivals)
        while len(arrivals) == seen and thread.is_alive() and time.perf_counter() - ended < 10:
            time.sleep(0.005)  # the gap that spans the joining request's end counts too
    finally:
        leave.set()
        thread.join(30)
        s.stop()
    assert not failed and first is not None and "Traceback" not in s.stderr(), (failed, s.stderr()[-2000:])
    before = [t for t in arrivals if t <= joined]
    worst = max(b - a for a, b in zip(arrivals, arrivals[1:]) if b > joined and a < ended)
    to_first = first - joined
    figures = (f"worst gap while it joins {worst * 1000:.0f} ms (mean gap before "
               f"{(before[-1] - before[0]) / (len(before) - 1) * 1000:.1f} ms); its first character after "
               f"{to_first * 1000:.0f} ms")
    assert worst < to_first / 4, figures
