"""Corpus reading and the train/validation split."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from rnngen.data import BatchStream, read_corpus, split_songs, train_val_split
from rnngen.errors import CorpusError

from conftest import make_songs


def test_bom_and_crlf_are_normalised(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeff第一行\r\n第二行\r\n\r\n第三行\r\n".encode("utf-8"))
    text = read_corpus([str(path)]).text
    assert text == "第一行\n第二行\n\n第三行\n"
    assert split_songs(text) == ["第一行\n第二行", "第三行"]


def test_directory_reads_its_txt_files_in_order(tmp_path):
    (tmp_path / "b.txt").write_text("乙", encoding="utf-8")
    (tmp_path / "a.txt").write_text("甲", encoding="utf-8")
    (tmp_path / "skip.md").write_text("不要", encoding="utf-8")
    assert split_songs(read_corpus([str(tmp_path)]).text) == ["甲", "乙"]


def test_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("你好\n".encode("utf-8"))))
    corpus = read_corpus(["-"])
    assert corpus.text == "你好\n" and corpus.sources == ["-"]


def test_gbk_needs_and_accepts_encoding(tmp_path):
    path = tmp_path / "gbk.txt"
    path.write_bytes("月光洒满窗台\n".encode("gbk"))
    with pytest.raises(CorpusError, match="--encoding gbk"):
        read_corpus([str(path)])
    assert read_corpus([str(path)], encoding="gbk").text == "月光洒满窗台\n"


@pytest.mark.parametrize("content,message", [
    (b"", "empty"), (b" \n\t\n", "empty"), (b"abc\x00\x01def", "binary"), (b"ok \xff\xfe bad", "not valid"),
])
def test_unusable_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        read_corpus([str(path)])


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        read_corpus([str(tmp_path / "nope.txt")])
    with pytest.raises(CorpusError, match="no .txt files"):
        read_corpus([str(tmp_path)])


def test_split_holds_out_whole_songs_seeded():
    text = make_songs(50)
    train, val = train_val_split(text, 0.1, seed=3)
    songs = split_songs(text)
    assert len(val) == 5 and len(train) == 45
    assert sorted(train + val) == sorted(songs)  # every song lands whole on one side
    assert train_val_split(text, 0.1, seed=3) == (train, val)
    assert train_val_split(text, 0.1, seed=4) != (train, val)


def test_text_without_blank_lines_is_split_by_its_tail():
    text = "\n".join(f"第{i}行歌词" for i in range(100))
    train, val = train_val_split(text, 0.1, seed=0)
    assert train[0].endswith("第89行歌词") and val[0].startswith("第90行歌词")


def test_batches_shift_each_epoch_and_targets_follow_inputs():
    data = torch.arange(1000)
    stream = BatchStream(data, batch_size=4, seq_len=10, seed=0)
    firsts = []
    for _ in range(stream.windows_per_epoch * 3):
        x, y, fresh = stream.next()
        assert torch.equal(y, x + 1)
        if fresh:
            firsts.append(x[0, 0].item())
    assert len(firsts) == 3 and len(set(firsts)) > 1


def test_tiny_corpus_shrinks_the_batch():
    stream = BatchStream(torch.arange(5), batch_size=64, seq_len=128, seed=0)
    x, y, _ = stream.next()
    assert x.shape[0] >= 1 and x.shape == y.shape
