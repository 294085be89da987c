"""Every bad input a user can give: one clear line on stderr, a non-zero exit, no traceback.

Inputs a tool should simply accept (a BOM, CRLF, emoji, a one-character or tiny corpus) must
train cleanly instead.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rnngen.cli import app

from conftest import TINY_FLAGS, make_songs


def train(runner, corpus: Path, out: Path, *extra: str):
    return runner.invoke(app, ["train", str(corpus), "--out", str(out), "--max-steps", "2", *TINY_FLAGS, *extra])


def one_error_line(result, code: int = 1) -> str:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize("name,content,words", [
    ("empty.txt", b"", ["empty"]),
    ("blank.txt", b"  \n\n\t \n", ["empty"]),
    ("binary.bin", b"\x7fELF\x00\x01\x02" * 50, ["binary"]),
    ("latin1.txt", "caf\u00e9 cr\u00e8me\n".encode("latin-1"), ["not valid utf-8"]),
    ("gbk.txt", ("春风吹过山岗\n" * 30).encode("gbk"), ["--encoding gbk"]),
    ("utf16.txt", "春风吹过\n".encode("utf-16"), ["utf-16"]),
])
def test_unusable_corpus(runner, tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    line = one_error_line(train(runner, path, tmp_path / "m"))
    for word in words:
        assert word in line
    assert not (tmp_path / "m").exists()


def test_missing_path_and_directory_without_text(runner, tmp_path):
    assert "no such file" in one_error_line(train(runner, tmp_path / "nope.txt", tmp_path / "m"))
    empty_dir = tmp_path / "lyrics"
    empty_dir.mkdir()
    (empty_dir / "cover.jpg").write_bytes(b"\xff\xd8")
    assert "no .txt files" in one_error_line(train(runner, empty_dir, tmp_path / "m"))


def test_unknown_encoding(runner, songs_file, tmp_path):
    assert "--encoding" in one_error_line(train(runner, songs_file, tmp_path / "m", "--encoding", "klingon"))


@pytest.mark.parametrize("content", [
    "\ufeff春风吹过山岗\r\n我在等你回来\r\n\r\n月光洒满窗台\r\n",  # BOM + CRLF
    "我",  # one character
    "短歌",  # shorter than one training window
    "🎵 星星 ✨\n𠀀𠀁𠀂 astral 😀\n\n🎶 second song 🎸\n",  # emoji and astral-plane characters
])
def test_awkward_but_valid_corpus_trains(runner, tmp_path, content):
    path = tmp_path / "odd.txt"
    path.write_text(content, encoding="utf-8")
    result = train(runner, path, tmp_path / "m")
    assert result.exit_code == 0, result.stderr
    sample = runner.invoke(app, ["sample", "--model", str(tmp_path / "m"), "--length", "5", "--random-seed", "1"])
    assert sample.exit_code == 0 and len(sample.stdout.rstrip("\n")) <= 5 + 1


def test_bpe_with_emoji_round_trips_in_samples(runner, tmp_path):
    path = tmp_path / "emoji.txt"
    path.write_text("\n\n".join(f"星星 {i} ✨ 😀 la la 𠀀" for i in range(200)), encoding="utf-8")
    result = train(runner, path, tmp_path / "m", "--tokenizer", "spm", "--vocab-size", "300")
    assert result.exit_code == 0, result.stderr
    out = runner.invoke(app, ["sample", "--model", str(tmp_path / "m"), "--seed", "😀", "--length", "30",
                              "--random-seed", "1"])  # a 4-step model can still draw a stray byte piece now and then
    assert out.exit_code == 0 and out.stdout.startswith("😀") and "\ufffd" not in out.stdout[:2]


def test_very_long_single_line(runner, tmp_path):
    path = tmp_path / "line.txt"
    rng = random.Random(0)
    path.write_text("".join(rng.choice("春夏秋冬风花雪月") for _ in range(5_000_000)), encoding="utf-8")
    result = train(runner, path, tmp_path / "m", "--max-steps", "1")
    assert result.exit_code == 0, result.stderr


def test_bf16_where_unsupported_or_fp16_on_cpu(runner, songs_file, tmp_path, monkeypatch):
    import rnngen.device as device

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    line = one_error_line(train(runner, songs_file, tmp_path / "m", "--precision", "bf16", "--device", "cpu"), 2)
    assert "bf16" in line
    line = one_error_line(train(runner, songs_file, tmp_path / "m", "--precision", "fp16", "--device", "cpu"), 2)
    assert "fp16" in line
    line = one_error_line(train(runner, songs_file, tmp_path / "m", "--device", "tpu"), 2)
    assert "--device" in line


def test_new_text_makes_a_new_model_from_the_old(runner, songs_file, tmp_path):
    out = tmp_path / "m"
    assert train(runner, songs_file, out).exit_code == 0
    other = tmp_path / "other.txt"
    other.write_text(make_songs(20, seed=5) + "\n\n全新的字\n", encoding="utf-8")
    line = one_error_line(runner.invoke(app, ["train", str(other), "--out", str(out), "--resume", "--threads", "1"]))
    assert "differs" in line and f"--from {out}" in line
    assert "--from" in one_error_line(runner.invoke(app, ["train", str(other), "--out", str(out), "--resume",
                                                          "--fine-tune"]), 2)
    result = runner.invoke(app, ["train", str(other), "--from", str(out), "--out", str(tmp_path / "m2"),
                                 "--max-steps", "4", "--threads", "1"])
    assert result.exit_code == 0, result.stderr
    meta = json.loads((tmp_path / "m2" / "config.json").read_text())
    assert meta["corpus"]["sources"] == [str(other.resolve())] and meta["from"]["new_chars"] >= 0
