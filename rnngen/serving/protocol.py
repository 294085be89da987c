"""The OpenAI completions protocol: request bodies in, checked sample requests and response objects out.

Field names and response shapes follow OpenAI's /v1/completions (as llama.cpp, ollama, vLLM and
LM Studio serve it): `max_tokens` counts characters here, `prompt` is the seed text, and rnngen's
own options ride along as extra body fields (`top_k`, `lines`, `line_length`, `acrostic`, `rhyme`,
`max_copy`, `songs`, `repetition_penalty`, `song_memory`, `stop_at_end`, `form`, `keywords`,
`topic`, `candidates`), with the library's defaults (a form's candidates: DEFAULT_CANDIDATES, as `rnngen
sample`).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from rnngen.config import DEFAULT_LENGTH, MAX_SEED, check_range
from rnngen.errors import RnngenError, UsageError
from rnngen.options import reword, server_names
from rnngen.sampling import SampleRequest

MAX_STOPS = 4  # stop sequences per request, as OpenAI allows
MAX_STOP_LENGTH = 200  # characters per stop sequence

OPENAI_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream",
                 "stream_options", "echo", "logprobs", "best_of", "presence_penalty", "frequency_penalty",
                 "logit_bias", "suffix", "user"}
RNNGEN_FIELDS = {"top_k", "lines", "line_length", "acrostic", "rhyme", "rhyme_book", "max_copy", "songs",
                 "repetition_penalty", "song_memory", "stop_at_end", "form", "candidates", "keywords", "topic"}

# the sample options named in the library's messages, as this protocol names them
@dataclass
class Limits:
    """What one request may ask of the server (the `rnngen serve` flags)."""

    max_tokens: int = 4000  # characters one choice may ask for (also the default with lines, songs or acrostic)
    max_n: int = 16  # choices per request (prompts x n)
    max_prompt: int = 4000  # characters in a prompt
    max_body: int = 1_000_000  # bytes in a request body
    max_streams: int = 256  # streams generating at once per model; a request beyond that gets 429
    request_timeout: float = 30.0  # seconds a client has to send a request's headers, and again its body

    def validate(self) -> None:
        check_range("--max-tokens", self.max_tokens, 1, 10_000_000, integer=True)
        check_range("--max-n", self.max_n, 1, 10_000, integer=True)
        check_range("--max-prompt", self.max_prompt, 1, 10_000_000, integer=True)
        check_range("--max-body", self.max_body, 1024, 1 << 30, integer=True)
        check_range("--max-streams", self.max_streams, 1, 100_000, integer=True)
        check_range("--request-timeout", self.request_timeout, 0, 3600, above_low=True)


class ApiError(Exception):
    """A request the server answers with a 4xx and the protocol's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        message, param = _encodable(message), param if param is None else _encodable(param)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_usage(exc: RnngenError) -> ApiError:
    """A library error about a request's values, worded with this protocol's parameter names (the
    option it names is exc.field; options.SAMPLE_OPTIONS maps flags to parameters)."""
    names = server_names()
    param = names.get(getattr(exc, "field", None) or "")
    return ApiError(400, reword(str(exc), names), param=param, code="invalid_value")


@dataclass
class Completion:
    """A /v1/completions request, its fields checked; its choices are prompt i, choice j at index i * n + j."""

    model: str | None
    prompts: list[str]
    n: int
    options: dict[str, Any]  # rnngen.Model.request's options (the sample command's flags' names)
    stops: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    seed: int = 0


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8", code="invalid_json") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    for key, value in data.items():  # a "\ud800" escape decodes to a lone surrogate, which no stream can write
        if not _unicode(key) or not _unicode(value):
            where = f"the field {key!r}" if _unicode(key) else "a field name"
            raise ApiError(400, f"{where} holds text that is not valid Unicode (a lone surrogate such as \\ud800); "
                           "send UTF-8 text", param=key if _unicode(key) else None, code="invalid_unicode")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins a valid pair, so any left is a lone half


def _unicode(value: Any) -> bool:
    """Whether every string in a JSON value (keys too) is valid Unicode: no lone surrogate."""
    stack = [value]
    while stack:  # a loop, not recursion: the body may nest as deep as the JSON parser allowed
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _encodable(text: str) -> str:
    """`text` with any lone surrogate written as an escape, so that an error echoing input can be sent."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def parse_completion(data: dict[str, Any], limits: Limits) -> Completion:
    """Check a completions body's fields and types; the model's own checks come when streams open."""
    for key in data:
        if key not in OPENAI_FIELDS and key not in RNNGEN_FIELDS:
            raise ApiError(400, f"Unrecognized request argument supplied: {key}", param=key,
                           code="unknown_parameter")
    model = _opt(data, "model", str)
    prompts = _prompts(data.get("prompt"), limits)
    n = _opt(data, "n", int, 1)
    if n < 1 or n * len(prompts) > limits.max_n:
        raise ApiError(400, f"n must be at least 1, and n times the number of prompts at most {limits.max_n} "
                       f"on this server (got n={n} with {len(prompts)} prompt(s))", param="n", code="invalid_value")
    _unsupported(data)
    stream = _opt(data, "stream", bool, False)
    options = _opt(data, "stream_options", dict, {})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool) or set(options) - {"include_usage"}:
        raise ApiError(400, "stream_options takes only include_usage (true or false)", param="stream_options",
                       code="invalid_type")
    echo = _opt(data, "echo", bool, False)
    stops = _stops(data.get("stop"))
    seed = _opt(data, "seed", int)
    if seed is None:
        seed = secrets.randbits(31)
    elif not 0 <= seed <= MAX_SEED:
        raise ApiError(400, f"seed must be between 0 and {MAX_SEED} (got {seed})", param="seed", code="invalid_value")

    options = {"temperature": _opt(data, "temperature", float), "top_p": _opt(data, "top_p", float),
               "top_k": _opt(data, "top_k", int), "lines": _opt(data, "lines", int),
               "line_length": _line_length(data.get("line_length")), "acrostic": _opt(data, "acrostic", str),
               "rhyme": _opt(data, "rhyme", str), "rhyme_book": _opt(data, "rhyme_book", str),
               "repetition_penalty": _opt(data, "repetition_penalty", float),
               "max_copy": _opt(data, "max_copy", int), "songs": _opt(data, "songs", int),
               "stop_at_end": _opt(data, "stop_at_end", bool), "song_memory": _opt(data, "song_memory", bool),
               "form": _opt(data, "form", str), "candidates": _opt(data, "candidates", int),
               "keywords": _keywords(data.get("keywords")), "topic": _opt(data, "topic", float)}
    options = {k: v for k, v in options.items() if v is not None}  # absent: the library's defaults
    length = _opt(data, "max_tokens", int)
    if length is None:  # as the CLI: until the lines, songs, acrostic or form are done (up to the cap), else 200
        shaped = any(options.get(k) for k in ("line_length", "acrostic", "rhyme", "songs", "form"))
        shaped = shaped or "lines" in options
        length = limits.max_tokens if shaped else min(DEFAULT_LENGTH, limits.max_tokens)
    elif not 1 <= length <= limits.max_tokens:
        raise ApiError(400, f"max_tokens must be between 1 and {limits.max_tokens} on this server (got {length})",
                       param="max_tokens", code="invalid_value")
    options["length"] = length
    return Completion(model=model, prompts=prompts, n=n, options=options, stops=stops, stream=stream,
                      include_usage=include_usage, echo=echo, seed=seed)


def sample_requests(comp: Completion, model) -> list[SampleRequest]:
    """One checked request per choice, built by the library (`model` is an rnngen.Model)."""
    requests = []
    try:
        for i, prompt in enumerate(comp.prompts):
            for j in range(comp.n):
                seed = (comp.seed + i * comp.n + j) % (MAX_SEED + 1)  # choice 0 of prompt 0 uses `seed` itself
                requests.append(model.request(prompt, random_seed=seed, **comp.options))
    except UsageError as exc:
        raise from_usage(exc) from None
    return requests


def _opt(data: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    """data[key] if it has the type (null: the default); a float field takes integers too."""
    value = data.get(key)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object"}
        raise ApiError(400, f"{key} must be {names[kind]} (got {json.dumps(value, ensure_ascii=False)[:40]})",
                       param=key, code="invalid_type")
    if kind is float:
        try:
            return float(value)
        except OverflowError:
            raise ApiError(400, f"{key} is too large", param=key, code="invalid_value") from None
    return value


def _prompts(value: Any, limits: Limits) -> list[str]:
    if value is None:
        prompts = [""]
    elif isinstance(value, str):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        prompts = list(value)
    else:
        raise ApiError(400, "prompt must be a string or a non-empty list of strings (token ids are not supported)",
                       param="prompt", code="invalid_type")
    for p in prompts:
        if len(p) > limits.max_prompt:
            raise ApiError(400, f"prompt is {len(p)} characters long; this server takes at most {limits.max_prompt}",
                           param="prompt", code="context_length_exceeded")
    return prompts


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stops) \
            or len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings of at most "
                       f"{MAX_STOP_LENGTH} characters", param="stop", code="invalid_value")
    return stops


def _line_length(value: Any) -> int | str | list[int] | None:
    if value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ApiError(400, "line_length must be a number, a pattern such as \"5,7,5\" or a list of numbers",
                   param="line_length", code="invalid_type")


def _keywords(value: Any) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ApiError(400, "keywords must be a string such as \"春风,明月\" or a list of strings", param="keywords",
                   code="invalid_type")


def _unsupported(data: dict[str, Any]) -> None:
    """OpenAI fields accepted only at the values that ask for nothing rnngen cannot do."""
    neutral = {"logprobs": (None, 0), "best_of": (None, 1), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "logit_bias": (None,), "suffix": (None, "")}
    for key, values in neutral.items():
        value = data.get(key)
        if key == "logit_bias" and value == {}:
            continue
        if not any(value == v and type(value) is type(v) for v in values):
            hint = " (rnngen has repetition_penalty)" if key.endswith("_penalty") else ""
            raise ApiError(400, f"{key} is not supported by this server{hint}", param=key, code="unsupported_parameter")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, "user must be a string", param="user", code="invalid_type")


# ---- responses --------------------------------------------------------------------------------


def completion_id() -> str:
    return "cmpl-" + secrets.token_hex(12)


def now() -> int:
    return int(time.time())


def choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}


def completion(cid: str, created: int, model: str, choices: list[dict], usage: dict | None) -> dict[str, Any]:
    body = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "system_fingerprint": None}
    if usage is not None:
        body["usage"] = usage
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
