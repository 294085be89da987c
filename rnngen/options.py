"""The sample options in one list: each one's keyword (generate's and SampleRequest's), command-line
flag, server parameter and default. The CLI, the API, the server and the web page are tested
against this list (tests/test_options.py); an option's value is checked in one place,
SampleRequest.validate (or, for the line rules, constraints.Structure.validate), whose UsageError
names the option (`field`), so each face can word the error with its own name for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rnngen.config import TOPIC_WEIGHT, SamplingSettings


@dataclass(frozen=True)
class Option:
    name: str  # generate()'s keyword
    flag: str  # rnngen sample's flag
    param: str  # the field of a /v1/completions body
    default: Any  # None: decided by other options (see sampling.make_request)


_S = SamplingSettings
SAMPLE_OPTIONS: tuple[Option, ...] = (
    Option("seed", "--seed", "prompt", ""),
    Option("length", "--length", "max_tokens", None),  # DEFAULT_LENGTH, or room for the lines or songs asked for
    Option("temperature", "--temperature", "temperature", _S.temperature),
    Option("top_k", "--top-k", "top_k", _S.top_k),
    Option("top_p", "--top-p", "top_p", _S.top_p),
    Option("num_samples", "--num-samples", "n", 1),
    Option("random_seed", "--random-seed", "seed", None),  # None: drawn at random
    Option("stop_at_end", "--stop-at-end", "stop_at_end", False),
    Option("songs", "--songs", "songs", None),
    Option("lines", "--lines", "lines", None),
    Option("line_length", "--line-length", "line_length", None),
    Option("acrostic", "--acrostic", "acrostic", ""),
    Option("rhyme", "--rhyme", "rhyme", ""),
    Option("rhyme_book", "--rhyme-book", "rhyme_book", None),  # the form's book with --form, else xinyun
    Option("repetition_penalty", "--repetition-penalty", "repetition_penalty", 1.0),
    Option("max_copy", "--max-copy", "max_copy", None),
    Option("song_memory", "--no-song-memory", "song_memory", True),  # the flag turns it off
    Option("form", "--form", "form", ""),
    Option("candidates", "--candidates", "candidates", None),  # DEFAULT_CANDIDATES with a form, else 1
    Option("keywords", "--keywords", "keywords", ""),
    Option("topic", "--topic", "topic", TOPIC_WEIGHT),
)


def reword(message: str, names: dict[str, str]) -> str:
    """A library message (worded with the command line's flags) with each option's flag replaced by
    another face's name for it (`names`: option name -> that name). Longer flags first, so
    --line-length is never read as --lines."""
    for option in sorted(SAMPLE_OPTIONS, key=lambda o: -len(o.flag)):
        if option.name in names and option.flag in message:
            message = message.replace(option.flag, names[option.name])
    return message


def server_names() -> dict[str, str]:
    return {o.name: o.param for o in SAMPLE_OPTIONS}
