"""rnngen serve and verse forms: /v1/forms, a form written with candidates per clause through the
engine's batch (streamed clause by clause, the library's poem for the same seed), the 400s for bad
form options, and the page's form picker. On the bundled 宋词 model (a char model that knows the
forms' characters)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import rnngen  # noqa: E402
from rnngen.config import DEFAULT_CANDIDATES  # noqa: E402
from rnngen.forms import FORMS, find_form  # noqa: E402

from test_serve import KEY, Server  # noqa: E402  (the real server in a subprocess)

WEB = Path(__file__).resolve().parents[1] / "rnngen" / "web"
CLAUSE = re.compile(r"^([\u3400-\u4dbf\u4e00-\u9fff]+)([，。？！])$")


@pytest.fixture(scope="module")
def songci():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server's default --threads: a 16-row batch is faster on one thread here
    try:
        yield rnngen.load("songci", device="cpu", precision="fp32")  # exact, as the server's engine
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(Path("songci"), tmp_path_factory.mktemp("serve-forms"), "--api-key", KEY, "--max-n", "4")
    yield s
    assert s.stop() == 130


def get(server: Server, path: str, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(server.url + path, headers=headers, timeout=30)


def stream(server: Server, body: dict) -> tuple[list[str], str | None]:
    """The text pieces of a streamed one-choice completion, and its finish reason."""
    pieces, finish = [], None
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=headers,
                      timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            for c in json.loads(line[6:])["choices"]:
                if c["text"]:
                    pieces.append(c["text"])
                finish = c["finish_reason"] or finish
    return pieces, finish


def clause_lengths(text: str) -> list[int]:
    lines = text.split("\n")
    assert all(CLAUSE.match(line) for line in lines), text
    return [len(line) - 1 for line in lines]


# ---- /v1/forms -----------------------------------------------------------------------------------


def test_forms_lists_every_form_with_its_pattern(server):
    assert get(server, "/v1/forms", key=None).status_code == 401  # an API endpoint: the key applies
    listing = get(server, "/v1/forms").json()
    assert listing["object"] == "list" and listing["default_candidates"] == DEFAULT_CANDIDATES
    assert [f["name"] for f in listing["data"]] == list(FORMS)
    by_name = {f["name"]: f for f in listing["data"]}
    qijue = by_name["七言绝句"]
    assert qijue == {"name": "七言绝句", "aliases": ["七绝"], "kind": "shi", "clauses": 4, "characters": 28,
                     "rhyme_book": "pingshui", "pattern": find_form("七绝").describe()}
    assert by_name["浣溪沙"]["kind"] == "ci" and by_name["浣溪沙"]["rhyme_book"] == "cilin"


# ---- writing a form --------------------------------------------------------------------------------


def test_a_form_with_candidates_streams_clause_by_clause(server):
    pieces, finish = stream(server, {"form": "七言绝句", "candidates": 4, "keywords": "春风", "seed": 5})
    text = "".join(pieces)
    assert clause_lengths(text) == [7, 7, 7, 7] and "春风" in text and finish == "stop"
    assert pieces == [line + "\n" for line in text.split("\n")[:-1]] + [text.split("\n")[-1]]  # one piece a clause


def test_the_server_writes_the_librarys_poem(server, songci):
    """Same seed, form, keywords and candidates: the server's poem is `rnngen.generate`'s in float32
    (the CLI's with --precision fp32), candidates given or left at the default."""
    for body, options in (({"form": "七言绝句", "candidates": 4, "seed": 3}, {"candidates": 4}),
                          ({"form": "浣溪沙", "keywords": ["明月"], "seed": 8}, {"keywords": "明月"})):
        result = server.post({**body, "n": 2}).json()
        texts = [c["text"] for c in sorted(result["choices"], key=lambda c: c["index"])]
        for i, text in enumerate(texts):  # choice i uses seed + i
            assert text == songci.generate(form=body["form"], random_seed=body["seed"] + i, **options)
        assert texts[0] != texts[1]
        assert result["usage"]["completion_tokens"] == sum(len(t) + 1 for t in texts)  # the kept tokens only


def test_the_engine_batches_candidates_beside_other_streams(songci):
    """Forms with candidates, one without, and plain text in one batch: each its library text."""
    from conftest import engine_texts
    from rnngen.serving.engine import Engine

    requests = [songci.request(form="七言绝句", random_seed=1, candidates=3),
                songci.request(form="如梦令", random_seed=2, candidates=2, acrostic="春"),
                songci.request(form="卜算子", random_seed=3, candidates=1),
                songci.request("明月", length=30, random_seed=4)]
    engine = Engine(songci)
    texts = engine_texts(engine, lambda sink: [engine.open(dataclasses.replace(r), [], sink, tag=i)
                                               for i, r in enumerate(requests)])
    for i, r in enumerate(requests):
        library = "".join(text for _, text in songci.samples(dataclasses.replace(r)))
        assert texts[i] == library[len(r.seed_text):], i


def test_a_poem_cancelled_mid_way_leaves_the_batch(songci):
    """A client that leaves after the first clause: its candidates go, the other poem is unchanged."""
    import threading

    from rnngen.serving.engine import Engine

    requests = [songci.request(form="七言律诗", random_seed=1, candidates=4),
                songci.request(form="七言绝句", random_seed=2, candidates=4)]
    texts, done = {0: "", 1: ""}, threading.Event()

    def sink(events):
        for stream, text, finish in events:
            texts[stream.tag] += text
            if stream.tag == 0 and text:
                stream.cancel()
            if stream.tag == 1 and finish:
                done.set()

    engine = Engine(songci)
    try:
        engine.submit([engine.open(dataclasses.replace(r), [], sink, tag=i) for i, r in enumerate(requests)])
        assert done.wait(60)
    finally:
        engine.close(wait=10)
    assert clause_lengths(texts[0].rstrip("\n")) == [7]
    assert texts[1] == songci.generate(form="七言绝句", random_seed=2, candidates=4)


@pytest.mark.parametrize("body, param", [
    ({"form": "七言绝句", "candidates": 0}, "candidates"),
    ({"form": "七言绝句", "candidates": 65}, "candidates"),
    ({"form": "七言绝句", "candidates": "4"}, "candidates"),
    ({"candidates": 4}, "candidates"),
    ({"form": "八言绝句"}, "form"),
    ({"form": 7}, "form"),
    ({"form": "七言绝句", "prompt": "春风"}, "form"),
    ({"form": "七言绝句", "keywords": 12}, "keywords"),
    ({"form": "七言绝句", "keywords": "spring"}, "keywords"),
    ({"form": "七言绝句", "keywords": "春风明月夜来花香"}, "keywords"),  # longer than any clause
])
def test_bad_form_options_name_the_parameter(server, body, param):
    response = server.post(body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert "--" not in error["message"], error  # worded with the server's names, not the CLI's flags


# ---- the page --------------------------------------------------------------------------------------


def test_the_page_has_a_form_picker_and_a_keywords_box(server):
    page = get(server, "/", key=None)
    assert page.status_code == 200 and "script-src" not in page.headers["content-security-policy"]
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    html = page.text
    for element in ('<select id="verse-form">', 'id="pattern"', 'id="keywords"', 'id="candidates"'):
        assert element in html, element
    assert re.findall(r"<script[^>]*>", html) == ['<script src="app.js">']  # no inline script
    script = (WEB / "app.js").read_text(encoding="utf-8")
    assert 'fetch("v1/forms"' in script
    for field in ("form", "keywords", "candidates"):
        assert re.search(rf"\bb\.{field}\s*=", script), field
