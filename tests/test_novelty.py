"""Copy checks: the corpus index, sample --max-copy, the --json copy report, evaluate --samples."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from typer.testing import CliRunner

from rnngen.cli import app
from rnngen.layout import INDEX_FILE
from rnngen.novelty import CorpusIndex, copy_report

from conftest import TINY_FLAGS, make_songs


def longest_copy(text: str, corpus: str) -> int:
    """Brute force: the longest substring of text found in corpus."""
    best = 0
    for i in range(len(text)):
        while i + best < len(text) and text[i : i + best + 1] in corpus:
            best += 1
    return best


@pytest.fixture(scope="module")
def parrot(tmp_path_factory):
    """A tiny model trained until it mostly recites its corpus: (model dir, corpus text)."""
    root = tmp_path_factory.mktemp("parrot")
    text = make_songs(12, seed=5)
    (root / "songs.txt").write_text(text, encoding="utf-8")
    flags = [f for f in TINY_FLAGS if f != "-q"]
    result = CliRunner().invoke(app, ["train", str(root / "songs.txt"), "--out", str(root / "m"), "--max-steps", "150",
                                      "--lr", "0.01", "--val-fraction", "0", *flags, "-q"])
    assert result.exit_code == 0, result.stderr
    return root / "m", text


def test_index_answers_like_brute_force(tmp_path):
    rng = random.Random(0)
    alphabet = "ab\n春秋。"
    corpus = "".join(rng.choice(alphabet) for _ in range(2000))
    index = CorpusIndex.build(corpus)
    index.save(tmp_path)
    loaded = CorpusIndex.load(tmp_path)
    for _ in range(300):
        run = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        assert loaded.contains(run) == (run in corpus)
    text = "".join(rng.choice(alphabet) for _ in range(100)) + corpus[500:800] + "xyz"
    assert loaded.match_lengths(text)[100] == 300 + (text[400:401] == corpus[800:801])
    report = copy_report(loaded, text)
    assert report.longest_copy == longest_copy(text, corpus)
    assert report.longest_copy_text in corpus and len(report.longest_copy_text) == report.longest_copy
    windows = [text[i : i + 8] for i in range(len(text) - 7)]
    assert report.copied_8gram_share == pytest.approx(sum(w in corpus for w in windows) / len(windows))


def test_runs_longer_than_the_sort_depth_are_measured_exactly():
    corpus = "春" * 300 + "秋" + "春" * 600
    assert copy_report(CorpusIndex.build(corpus), "春" * 500).longest_copy == 500


def test_damaged_index_is_a_clear_error(tmp_path):
    (tmp_path / INDEX_FILE).write_bytes(b"not an index")
    from rnngen.errors import ModelError

    with pytest.raises(ModelError, match="copy-check index"):
        CorpusIndex.load(tmp_path)


def sample_json(runner, model, *args) -> dict:
    result = runner.invoke(app, ["sample", "--model", str(model), "--json", "--random-seed", "1", *args])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_max_copy_never_copies_more_than_k(runner, parrot):
    model, corpus = parrot
    free = sample_json(runner, model, "--length", "2000")
    assert free["longest_copy"] == longest_copy(free["text"], corpus) > 8  # the model does recite
    guarded = sample_json(runner, model, "--length", "2000", "--max-copy", "8")
    text = guarded["text"]
    assert len(text) == 2000
    assert not any(text[i : i + 9] in corpus for i in range(len(text) - 8))  # brute force
    assert guarded["longest_copy"] == longest_copy(text, corpus) <= 8
    assert guarded["max_copy"] == 8


def test_max_copy_with_structure_and_many_streams(runner, parrot):
    model, corpus = parrot
    result = runner.invoke(app, ["sample", "--model", str(model), "--random-seed", "2", "--num-samples", "3",
                                 "--lines", "6", "--line-length", "5", "--max-copy", "6"])
    assert result.exit_code == 0, result.stderr
    for text in result.stdout.strip("\n").split("\n\n"):
        lines = text.split("\n")
        assert len(lines) == 6 and all(len(line) == 5 for line in lines)
        if "structure won" not in result.stderr:
            assert longest_copy(text, corpus) <= 6


def test_evaluate_samples_reports_copying(runner, parrot, tmp_path):
    model, corpus = parrot
    text = "我我我\n" + corpus[10:60] + "\n"
    (tmp_path / "s.txt").write_text(text, encoding="utf-8")
    result = runner.invoke(app, ["evaluate", "--model", str(model), "--samples", str(tmp_path / "s.txt"), "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["longest_copy"] == longest_copy(text, corpus) >= 50
    piped = runner.invoke(app, ["evaluate", "--model", str(model), "--samples", "-", "--json"], input=text)
    assert json.loads(piped.stdout)["longest_copy"] == record["longest_copy"]
    table = runner.invoke(app, ["evaluate", "--model", str(model), "--samples", str(tmp_path / "s.txt")])
    assert table.exit_code == 0 and "longest run" in table.stdout


@pytest.mark.parametrize("args,message", [
    (["sample", "--max-copy", "0"], "--max-copy must be between 1"),
    (["evaluate", "--samples", "-", "x.txt"], "not both"),
])
def test_bad_copy_options(runner, parrot, args, message):
    result = runner.invoke(app, [*args, "--model", str(parrot[0])], input="x")
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_model_without_index(runner, parrot, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(parrot[0], bare)
    (bare / INDEX_FILE).unlink()
    result = runner.invoke(app, ["sample", "--model", str(bare), "--max-copy", "8"])
    assert result.exit_code != 0 and "no copy-check index" in result.stderr
    plain = sample_json(runner, bare, "--length", "20")
    assert plain["longest_copy"] is None and len(plain["text"]) == 20


def test_interactive_answers_each_seed(runner, parrot):
    result = runner.invoke(app, ["sample", "--model", str(parrot[0]), "--interactive", "--length", "12",
                                 "--random-seed", "4"], input="春风\n\n")
    assert result.exit_code == 0, result.stderr
    # two answers, one per line typed: 春风 + 12 characters, then 12 characters for a new song
    assert result.stdout.startswith("春风") and len(result.stdout) == (2 + 12 + 1) + (12 + 1)
    assert result.stderr.count("seed>") == 3 and "seed>" not in result.stdout
    bad = runner.invoke(app, ["sample", "--model", str(parrot[0]), "--interactive", "--acrostic", "春"], input="我\n")
    assert bad.exit_code == 0 and "leave out --seed" in bad.stderr  # answered, and the loop went on to EOF
