"""rnngen serve: a real server (a subprocess on a free loopback port) driven by the official openai client."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "test-key"
SERVER_FLAGS = ["--max-tokens", "100000", "--max-n", "4", "--max-prompt", "50", "--max-body", "4096"]


class Server:
    """`rnngen serve` in a subprocess, its stderr (the access log) in a file."""

    def __init__(self, model: Path, tmp: Path, *flags: str):
        self.log = tmp / f"serve-{time.monotonic_ns()}.log"
        self.err = open(self.log, "w", encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, "-m", "rnngen", "serve", "--model", str(model), "--port", "0",
                                      *flags], cwd=tmp, stdout=subprocess.DEVNULL, stderr=self.err,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 60
        while True:
            found = re.search(r"on (http://\S+?)/ ", self.stderr())
            if found:
                self.url = found.group(1)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start:\n{self.stderr()}")
            time.sleep(0.05)

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8")

    def client(self, key: str | None = KEY) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=60)

    def post(self, body, key: str | None = KEY, timeout: float = 60) -> httpx.Response:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(self.url + "/v1/completions", content=content, headers=headers, timeout=timeout)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(trained_dir, tmp_path_factory):
    s = Server(trained_dir, tmp_path_factory.mktemp("serve"), "--api-key", KEY, *SERVER_FLAGS)
    yield s
    assert s.stop() == 130


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def complete(client, **kw) -> "openai.types.Completion":
    return client.completions.create(model=kw.pop("model", "model"), **kw)


def streamed(client, **kw) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in client.completions.create(model="model", stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            finish = c.finish_reason or finish
    return text, finish


# ---- the protocol --------------------------------------------------------------------------------


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["model"]
    assert models.data[0].owned_by == "rnngen"


def test_completion_fields_and_exact_length(client):
    result = complete(client, prompt="春风", max_tokens=40, seed=7)
    assert result.id.startswith("cmpl-") and result.object == "text_completion" and result.model == "model"
    assert isinstance(result.created, int)
    [choice] = result.choices
    assert len(choice.text) == 40 and choice.finish_reason == "length" and choice.index == 0
    assert result.usage.prompt_tokens == 2 and result.usage.completion_tokens >= 40
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_same_seed_same_text_plain_and_streamed(client):
    a = complete(client, prompt="月", max_tokens=60, seed=11).choices[0].text
    b = complete(client, prompt="月", max_tokens=60, seed=11).choices[0].text
    c = complete(client, prompt="月", max_tokens=60, seed=12).choices[0].text
    text, finish = streamed(client, prompt="月", max_tokens=60, seed=11)
    assert a == b == text and a != c
    assert finish == "length"


def test_stream_events_end_with_done_and_usage(server):
    response = server.post({"model": "model", "prompt": "我", "max_tokens": 20, "seed": 1, "stream": True,
                            "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 20
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == \
        complete(server.client(), prompt="我", max_tokens=20, seed=1).choices[0].text


def test_n_choices_each_seeded(client):
    result = complete(client, prompt="雨", max_tokens=30, seed=5, n=3)
    assert [c.index for c in result.choices] == [0, 1, 2]
    texts = [c.text for c in result.choices]
    assert texts[0] == complete(client, prompt="雨", max_tokens=30, seed=5).choices[0].text
    assert texts[1] == complete(client, prompt="雨", max_tokens=30, seed=6).choices[0].text
    assert len(set(texts)) == 3


def test_same_text_alone_and_beside_other_streams(client):
    """Continuous batching must not change a stream: rows join and leave around it at other steps."""
    settings = dict(prompt="春", max_tokens=300, seed=42, temperature=0.9, extra_body={"top_k": 20})
    alone = complete(client, **settings).choices[0].text
    results: dict[int, str] = {}

    def other(i: int) -> None:  # different lengths, settings and structure, arriving at different steps
        time.sleep(0.01 * i)
        options = {"lines": 3, "line_length": 5} if i % 2 else {}
        results[i] = streamed(client, prompt="风" * (i % 3), max_tokens=50 + 80 * i, seed=i, top_p=0.9,
                              extra_body=options)[0]

    threads = [threading.Thread(target=other, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.02)
    beside, _ = streamed(client, **settings)
    for t in threads:
        t.join()
    assert beside == alone and len(results) == 6


def test_structure_options_through_extra_body(client, trained_dir):
    result = complete(client, prompt="", seed=3, extra_body={"lines": 4, "line_length": 5, "acrostic": "春我月梦"})
    text = result.choices[0].text
    lines = text.split("\n")
    assert len(lines) == 4 and [line[0] for line in lines] == list("春我月梦")
    assert all(len(re.sub(r"[^\w]", "", line)) == 5 for line in lines)
    assert result.choices[0].finish_reason == "stop"
    rhymed = complete(client, prompt="", seed=4, extra_body={"lines": 4, "line_length": "5,6", "rhyme": "AABB", "top_k": 5,
                                                  "max_copy": 6, "repetition_penalty": 1.2})
    assert len(rhymed.choices[0].text.split("\n")) == 4


def test_stop_sequence_ends_the_text(client):
    result = complete(client, prompt="春风", max_tokens=500, seed=9, stop=["\n"])
    assert "\n" not in result.choices[0].text and result.choices[0].finish_reason == "stop"
    text, finish = streamed(client, prompt="春风", max_tokens=500, seed=9, stop="\n")
    assert text == result.choices[0].text and finish == "stop"
    whole = complete(client, prompt="春风", max_tokens=200, seed=9).choices[0].text
    stop = whole[30:33]  # spans several one-character pieces: held back until it is known not to match
    text, finish = streamed(client, prompt="春风", max_tokens=200, seed=9, stop=[stop, "不会出现的词"])
    assert text == whole[: whole.index(stop)] and finish == "stop"


def test_echo_puts_the_prompt_first(client):
    plain = complete(client, prompt="春风", max_tokens=10, seed=2).choices[0].text
    assert complete(client, prompt="春风", max_tokens=10, seed=2, echo=True).choices[0].text == "春风" + plain


# ---- bad requests: a 4xx with the protocol's error object, and the server keeps serving --------------

BAD = [
    ("{bad json", 400, None),
    ("[1, 2]", 400, None),
    ('{"prompt": "a", "temperature": NaN}', 400, None),
    ({"model": "nope"}, 404, "model"),
    ({"max_tokens": 100001}, 400, "max_tokens"),
    ({"max_tokens": "ten"}, 400, "max_tokens"),
    ({"n": 5}, 400, "n"),
    ({"prompt": ["a", "b", "c"], "n": 2}, 400, "n"),
    ({"prompt": "春" * 51}, 400, "prompt"),
    ({"prompt": [1, 2, 3]}, 400, "prompt"),
    ({"temperature": -1}, 400, "temperature"),
    ('{"model": "model", "temperature": 1e999}', 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_k": 10**6}, 400, "top_k"),
    ({"seed": -1}, 400, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"stream": "yes"}, 400, "stream"),
    ({"logprobs": 3}, 400, "logprobs"),
    ({"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"colour": "blue"}, 400, "colour"),
    ({"rhyme": "A1"}, 400, "rhyme"),
    ({"line_length": "5,x"}, 400, "line_length"),
    ({"lines": 0}, 400, "lines"),
    ({"acrostic": "龘"}, 400, "acrostic"),
    ({"acrostic": "春", "prompt": "我"}, 400, "acrostic"),
    ({"max_copy": 0}, 400, "max_copy"),
    ({"songs": -2}, 400, "songs"),
    ("x" * 5000, 413, None),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{i}-{s}-{p}" for i, (_, s, p) in enumerate(BAD)])
def test_bad_request_is_a_4xx_error_object(server, body, status, param):
    if isinstance(body, dict):
        body = {"model": "model", "prompt": "春", "max_tokens": 5, **body}
    response = server.post(body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["message"] and "Traceback" not in response.text and "\n" not in error["message"]
    assert "--" not in error["message"]  # the protocol's names, not the command line's


def test_openai_client_raises_the_matching_errors(server, client):
    with pytest.raises(openai.NotFoundError):
        complete(client, model="missing", prompt="春")
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, prompt="春", temperature=-2)
    assert caught.value.param == "temperature"
    with pytest.raises(openai.AuthenticationError):
        complete(server.client("wrong-key"), prompt="春", max_tokens=5)
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong-key").models.list()


def test_wrong_or_missing_key_is_401_but_page_and_health_are_open(server):
    assert server.post({"prompt": "a"}, key=None).status_code == 401
    response = server.post({"prompt": "a"}, key="nope")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(server.url + "/", timeout=10).status_code == 200
    assert server.health()["status"] == "ok"


def test_the_key_can_come_from_the_environment(trained_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RNNGEN_API_KEY", "from-env")  # kept out of `ps` and shell history
    s = Server(trained_dir, tmp_path)
    try:
        assert s.post({"prompt": "a", "max_tokens": 3}, key="from-env").status_code == 200
        assert s.post({"prompt": "a", "max_tokens": 3}, key=KEY).status_code == 401
    finally:
        s.stop()


def test_unknown_path_and_method(server):
    for response in (httpx.get(server.url + "/nope", timeout=10),
                     httpx.get(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)):
        assert response.status_code in (404, 405)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_disconnect_stops_the_stream_at_once(server):
    body = {"model": "model", "prompt": "春", "max_tokens": 100000, "seed": 1, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as response:
        lines = response.iter_lines()  # kept: closing this iterator would close the response
        assert next(line for line in lines if line.startswith("data: "))
        assert server.health()["streams"] >= 1
    deadline = time.monotonic() + 5
    while server.health()["streams"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.health()["streams"] == 0
    time.sleep(0.2)  # the access log line is written when the response ends
    records = [json.loads(line) for line in server.stderr().splitlines() if line.startswith("{")]
    record = [r for r in records if r["path"] == "/v1/completions"][-1]
    assert 0 < record["chars"] < 100000


def test_disconnect_stops_a_whole_completion_too(server):
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        server.post({"model": "model", "prompt": "春", "max_tokens": 100000, "seed": 2}, timeout=0.5)
    deadline = time.monotonic() + 5
    while server.health()["streams"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.health()["streams"] == 0


def test_access_log_is_one_json_line_per_request(server):
    complete(server.client(), prompt="月", max_tokens=7, seed=1)
    time.sleep(0.1)
    lines = [line for line in server.stderr().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert {"method", "path", "status", "duration_ms", "model", "chars"} <= set(records[-1])
    mine = [r for r in records if r["path"] == "/v1/completions" and r["chars"] == 7]
    assert mine and mine[-1]["status"] == 200 and mine[-1]["model"] == "model"
    assert "Traceback" not in server.stderr()


def test_page_is_served_and_self_contained(server):
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="app.js"' in page.text and 'href="style.css"' in page.text
    for name in ("app.js", "style.css"):
        response = httpx.get(f"{server.url}/{name}", timeout=10)
        assert response.status_code == 200 and response.text
        assert not re.search(r"https?://", response.text)  # nothing from elsewhere: it works offline
    assert not re.search(r"(src|href)=\"https?://", page.text)
    assert "藏头" in page.text and "Acrostic" in httpx.get(server.url + "/app.js", timeout=10).text


# ---- stopping --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signal_ends_streams_and_exits(trained_dir, tmp_path, sig, code):
    s = Server(trained_dir, tmp_path, "--max-tokens", "100000", "--max-streams", "1")
    try:
        body = {"model": "model", "prompt": "春", "max_tokens": 100000, "seed": 1, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            busy = s.post({"prompt": "春", "max_tokens": 5}, key=None)  # beyond --max-streams
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "server_busy"
            s.proc.send_signal(sig)
            rest = [line for line in lines if line]  # the stream ends: its last event, then [DONE]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert s.proc.wait(20) == code
    finally:
        s.stop()
    assert "Traceback" not in s.stderr()


# ---- the engine against the library ------------------------------------------------------------------


@pytest.mark.parametrize("rnn_type", ["lstm", "gru", "rnn"])
def test_engine_writes_what_the_library_writes(songs_file, tmp_path, rnn_type):
    """The engine and generate() share Sampler.open, prefill and pick: with an exact sampler (the
    server's; the library's in float32) the engine's text is generate()'s, token for token, for
    any network type, alone or beside other streams."""
    from typer.testing import CliRunner

    import rnngen
    from rnngen.cli import app
    from rnngen.serving.engine import Engine
    from conftest import TINY_FLAGS, engine_texts

    out = tmp_path / rnn_type
    trained = CliRunner().invoke(app, ["train", str(songs_file), "--out", str(out), "--max-steps", "6",
                                       "--rnn-type", rnn_type, *TINY_FLAGS])
    assert trained.exit_code == 0, trained.stderr
    model = rnngen.load(str(out), device="cpu", precision="fp32")
    options = [dict(length=80), dict(length=60, temperature=1.3, top_k=7, top_p=0.8),
               dict(lines=4, line_length="5,6", rhyme="ABAB"), dict(acrostic="春我月梦", line_length=5),
               dict(songs=2, length=400), dict(length=100, stop_at_end=True), dict(length=120, max_copy=5),
               dict(length=50, song_memory=False, repetition_penalty=1.3)]
    requests = [model.request("" if "acrostic" in o else "风" * (1 + 300 * (i % 2)), random_seed=i, **o)
                for i, o in enumerate(options)]  # every other prompt is longer than a chunk

    engine = Engine(model)
    texts = engine_texts(engine, lambda sink: [engine.open(dataclasses.replace(r), [], sink, tag=i)
                                               for i, r in enumerate(requests)])
    for i, r in enumerate(requests):
        pieces = ""
        try:
            for _, text in model.samples(dataclasses.replace(r)):
                pieces += text
        except rnngen.RnngenError:  # Incomplete: short of its songs; the text made so far still counts
            pass
        assert texts.get(i, "") == pieces[len(r.seed_text):], options[i]
