"""Song structure: --lines, --line-length, --acrostic, --rhyme, --songs, --repetition-penalty."""

from __future__ import annotations

import pytest

from rnngen.cli import app
from rnngen.constraints import _rhyme_keys


def sample(runner, model, *args):
    result = runner.invoke(app, ["sample", "--model", str(model), "--random-seed", "3", *args])
    return result


def lines_of(result) -> list[str]:
    assert result.exit_code == 0, result.stderr
    return result.stdout.removesuffix("\n").split("\n")


def test_lines_and_line_length(runner, trained_dir):
    lines = lines_of(sample(runner, trained_dir, "--lines", "8", "--line-length", "7"))
    assert len(lines) == 8 and all(len(line) == 7 for line in lines)


def test_line_length_pattern_cycles(runner, trained_dir):
    lines = lines_of(sample(runner, trained_dir, "--lines", "6", "--line-length", "5,7,5"))
    assert [len(line) for line in lines] == [5, 7, 5, 5, 7, 5]


def test_lines_without_lengths_has_no_empty_lines(runner, trained_dir):
    lines = lines_of(sample(runner, trained_dir, "--lines", "5"))
    assert len(lines) == 5 and all(lines)


def test_acrostic(runner, trained_dir):
    lines = lines_of(sample(runner, trained_dir, "--acrostic", "春我月梦"))
    assert [line[0] for line in lines] == list("春我月梦")


def rhyme_keys(char: str, model_dir) -> frozenset:
    from rnngen.tokenizer import CharTokenizer

    tok = CharTokenizer.load(model_dir)
    return _rhyme_keys(tuple(tok.itos))[tok.stoi[char]]


@pytest.mark.parametrize("scheme,pairs", [("AABB", [(0, 1), (2, 3)]), ("ABAB", [(0, 2), (1, 3)]),
                                          ("AAAA", [(0, 1), (1, 2), (2, 3)])])
def test_rhyme_schemes(runner, trained_dir, scheme, pairs):
    for seed in ("1", "2"):
        result = runner.invoke(app, ["sample", "--model", str(trained_dir), "--random-seed", seed, "--lines", "4",
                                     "--line-length", "6", "--rhyme", scheme])
        lines = lines_of(result)
        assert len(lines) == 4
        for a, b in pairs:
            assert rhyme_keys(lines[a][-1], trained_dir) & rhyme_keys(lines[b][-1], trained_dir), (scheme, lines)


def test_everything_together(runner, trained_dir):
    lines = lines_of(sample(runner, trained_dir, "--acrostic", "春我月梦", "--line-length", "7", "--rhyme", "AABB",
                            "--repetition-penalty", "1.3", "--temperature", "1.0", "--top-p", "0.95"))
    assert len(lines) == 4 and all(len(line) == 7 for line in lines)
    assert [line[0] for line in lines] == list("春我月梦")
    assert rhyme_keys(lines[0][-1], trained_dir) & rhyme_keys(lines[1][-1], trained_dir)


@pytest.mark.parametrize("seed", ["1", "2", "3", "4"])
def test_songs_are_whole_and_never_empty(runner, trained_dir, seed):
    result = runner.invoke(app, ["sample", "--model", str(trained_dir), "--random-seed", seed, "--songs", "2"])
    assert result.exit_code == 0, result.stderr
    songs = result.stdout.removesuffix("\n").split("\n\n")
    assert len(songs) == 2 and all(song.strip() for song in songs), result.stdout


def test_an_empty_song_is_skipped_not_counted():
    from rnngen.sampling import Writer, make_request
    from rnngen.tokenizer import CharTokenizer

    tok = CharTokenizer.train(["ab"])
    a, b, eos = tok.stoi["a"], tok.stoi["b"], tok.eos_id
    writer = Writer(make_request(songs=2), tok)
    out = [writer.push(t) for t in (eos, eos, a, eos, eos, b, eos)]
    assert "".join(out) == "a" + tok.stream_decoder().push(eos) + "b" and writer.done


@pytest.mark.parametrize("args,words", [
    (["--acrostic", "春X"], ["--acrostic", "X"]), (["--line-length", "0"], ["--line-length"]),
    (["--line-length", "5,x"], ["--line-length"]), (["--lines", "0"], ["--lines"]),
    (["--rhyme", "A1", "--line-length", "5"], ["--rhyme"]), (["--rhyme", "A1"], ["--rhyme"]),
    (["--songs", "0"], ["--songs"]), (["--repetition-penalty", "0"], ["--repetition-penalty"]),
    (["--acrostic", "春", "--seed", "我"], ["--seed"]),
])
def test_impossible_structure_requests(runner, trained_dir, args, words):
    result = sample(runner, trained_dir, *args)
    assert result.exit_code == 2, result.stderr
    line = result.stderr.strip()
    assert line.startswith("Error:") and "\n" not in line and all(w in line for w in words)


def test_a_full_line_may_end_with_punctuation_but_not_a_symbol():
    """songci marks lost characters with □ (a symbol): it must not close a line as if it were a mark."""
    import torch

    from rnngen.constraints import LyricsConstraint, Structure
    from rnngen.tokenizer import CharTokenizer

    tok = CharTokenizer.train(["春风□。\n月 光，"])
    rules = LyricsConstraint(Structure(line_lengths=[2]), tok, 1)
    for ch in "春风":
        rules.update(torch.tensor([tok.stoi[ch]]))
    allowed = {tok.itos[i] for i in torch.nonzero(rules.mask(torch.zeros(1, tok.vocab_size))[0] > -1e9).flatten().tolist()}
    assert allowed == {"。", "，", "\n"}
