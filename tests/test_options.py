"""The one list of sample options (rnngen/options.py): every face offers each option, and an option's
check lives in one place, whose error each face words with its own name for the option."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import rnngen.sampling
from rnngen.cli import app
from rnngen.errors import UsageError
from rnngen.options import SAMPLE_OPTIONS
from rnngen.sampling import make_request

WEB = Path(__file__).resolve().parents[1] / "rnngen" / "web" / "app.js"


def test_every_option_is_offered_by_every_face(runner):
    helptext = re.sub(r"\s+", " ", runner.invoke(app, ["sample", "--help"], env={"COLUMNS": "300"}).stdout)
    keywords = inspect.signature(make_request).parameters
    from rnngen.serving.protocol import OPENAI_FIELDS, RNNGEN_FIELDS

    for option in SAMPLE_OPTIONS:
        assert option.flag in helptext, option
        assert option.name in keywords, option
        assert option.param in OPENAI_FIELDS | RNNGEN_FIELDS, option
        if option.default is not None and option.name != "seed":
            assert keywords[option.name].default == option.default, option


def test_the_page_sends_only_options_the_server_knows():
    from rnngen.serving.protocol import OPENAI_FIELDS, RNNGEN_FIELDS

    sent = set(re.findall(r"\bb\.([a-z_]+)\s*=", WEB.read_text(encoding="utf-8")))
    assert sent and sent <= OPENAI_FIELDS | RNNGEN_FIELDS, sent


def test_one_range_change_reaches_every_face(runner, trained_dir, monkeypatch):
    monkeypatch.setattr(rnngen.sampling, "MAX_TEMPERATURE", 5)
    cli = runner.invoke(app, ["sample", "--model", str(trained_dir), "--temperature", "6"])
    assert cli.exit_code == 2 and "--temperature must be between 0 and 5" in cli.stderr
    with pytest.raises(UsageError) as info:
        make_request(temperature=6)
    assert info.value.field == "temperature"
    pytest.importorskip("starlette")
    from rnngen.serving.protocol import from_usage

    api = from_usage(info.value)
    assert api.param == "temperature" and api.message.startswith("temperature must be between 0 and 5")
    with pytest.raises(UsageError) as info:
        make_request(line_length=[5, 0])
    assert from_usage(info.value).param == "line_length" and "--" not in from_usage(info.value).message
