"""Big corpora: the streamed pass equals reading the whole text, and the token cache feeds training unchanged."""

from __future__ import annotations

import json
import mmap

import numpy as np
import pytest
import torch

import rnngen.data as data
from rnngen import tokencache as tokens
from rnngen.config import TrainConfig
from rnngen.data import BatchStream, Corpus, held_out, iter_text, open_corpus, read_corpus, split_songs, train_val_split
from rnngen.tokenizer import CharTokenizer
from rnngen.training import train

from conftest import TINY, make_english, make_songs


def quiet(kind, info):
    pass


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Pieces of a few bytes, so every boundary case (CRLF, a multi-byte character, a separator) gets split."""
    monkeypatch.setattr(data, "CHUNK_BYTES", 5)


def awkward_files(tmp_path):
    root = tmp_path / "lyrics"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes("\ufeff春风\r\n吹过\r\n\r\n山岗 \r\n".encode("utf-8"))
    (root / "b.txt").write_bytes(b"ab\r\r\ncd\r" + "月光😀洒满\n\n\n  窗台\n".encode("utf-8") + b"x\r\n")
    (root / "sub" / "c.txt").write_bytes("\n\n你说\u3000\n\t\n爱是永远".encode("utf-8"))
    return root


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 7, 4096])
def test_streamed_text_and_hash_equal_read_corpus(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(data, "CHUNK_BYTES", chunk)
    root = awkward_files(tmp_path)
    for inputs in ([str(root)], [str(root / "b.txt"), str(root / "a.txt")], [str(root / "sub" / "c.txt")]):
        whole = read_corpus(inputs)
        files = open_corpus(inputs)
        assert files.sources == whole.sources
        assert "".join(text for text, _ in iter_text(files)) == whole.text
        scanned = tokens.scan(files, quiet)
        assert (scanned.sha256, scanned.bytes, scanned.songs) == (whole.sha256, whole.size, len(split_songs(whole.text)))


def test_utf16_and_gbk_stream_like_read_corpus(tmp_path, tiny_chunks):
    for encoding in ("utf-16", "gbk"):
        path = tmp_path / f"{encoding}.txt"
        path.write_bytes("春风吹过山岗\r\n\r\n我在等你回来\r\n".encode(encoding))
        assert tokens.scan(open_corpus([str(path)], encoding), quiet).sha256 == read_corpus([str(path)], encoding).sha256


def build(corpus, tmp_path, **config):
    out = tmp_path / "m"
    out.mkdir(parents=True, exist_ok=True)
    tok, scanned = tokens.build(corpus, out, TrainConfig(**config), None, quiet)
    return tok, tokens.load(out, scanned.sha256), out


def assert_same_as_in_memory(text, tmp_path, val_fraction=0.1, seed=1337):
    train_songs, val_songs = train_val_split(text, val_fraction, seed)
    tok, got, _ = build(Corpus(text, ["-"], "utf-8"), tmp_path, val_fraction=val_fraction, seed=seed)
    want = CharTokenizer.train(train_songs)
    assert tok.itos == want.itos
    assert np.array_equal(got.train, want.encode_songs(train_songs).numpy())
    if val_songs:  # (encode_songs([]) is one stray end of song; no validation is no ids)
        assert np.array_equal(got.val, want.encode_songs(val_songs).numpy())
    else:
        assert len(got.val) == 0
    assert got.train_chars == sum(map(len, train_songs)) + len(train_songs)
    assert got.val_chars == sum(map(len, val_songs)) + len(val_songs)
    assert np.array_equal(got.counts, np.bincount(got.train, minlength=tok.vocab_size))


def test_token_ids_equal_encode_songs(tmp_path, tiny_chunks):
    songs = split_songs(make_songs(40))
    held = sorted(held_out(len(songs), 0.1, 1337))
    songs[held[0]] = "只在验证里的字\n" + songs[held[0]]  # characters the vocabulary must not get
    assert_same_as_in_memory("\n\n".join(songs) + "\n", tmp_path)


@pytest.mark.parametrize("text", [
    "\n".join(f"第{i}行歌词" for i in range(100)),  # no blank lines: the tail is held out
    "春夏秋冬" * 50 + "\n" + "风花雪月" * 40,  # long lines, longer than the buffer
    "一行\n\n\n",  # one short song: nothing to hold out
])
def test_one_song_corpus_splits_like_train_val_split(tmp_path, tiny_chunks, text):
    assert_same_as_in_memory(text, tmp_path)


def test_no_validation_split(tmp_path, tiny_chunks):
    assert_same_as_in_memory(make_songs(10), tmp_path, val_fraction=0.0)


def test_spm_ids_equal_encode_songs(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 300)
    text = make_english(40)
    tok, got, _ = build(Corpus(text, ["-"], "utf-8"), tmp_path, tokenizer="spm", vocab_size=300)
    train_songs, val_songs = train_val_split(text, 0.1, 1337)
    assert np.array_equal(got.train, tok.encode_songs(train_songs).numpy())
    assert np.array_equal(got.val, tok.encode_songs(val_songs).numpy())


def test_smallest_dtype(tmp_path):
    assert [tokens.dtype_for(n).name for n in (10, 256, 257, 65536, 65537)] == \
        ["uint8", "uint8", "uint16", "uint16", "uint32"]
    _, small, _ = build(Corpus(make_songs(10), ["-"], "utf-8"), tmp_path / "a")
    many = "\n\n".join(chr(0x4E00 + i) * 3 for i in range(400))
    _, big, _ = build(Corpus(many, ["-"], "utf-8"), tmp_path / "b", val_fraction=0.0)
    assert small.train.dtype == np.uint8 and big.train.dtype == np.uint16
    assert isinstance(big.train.base.obj, mmap.mmap)  # a view of the file, not a copy in memory


def small_config(**kw) -> TrainConfig:
    base = dict(batch_size=4, seq_len=16, eval_every=5, warmup_steps=2, time_limit=None, max_steps=6, patience=0)
    return TrainConfig(**{**base, **kw})


def test_cache_reused_on_resume_and_rebuilt_for_a_new_corpus(tmp_path):
    path = tmp_path / "songs.txt"
    path.write_text(make_songs(30), encoding="utf-8")
    out = tmp_path / "m"
    train(open_corpus([str(path)]), out, TINY, small_config())
    sha = json.loads((out / "config.json").read_text())["corpus"]["sha256"]
    assert sha == read_corpus([str(path)]).sha256
    files = sorted((out / "tokens").iterdir())
    assert [f.name for f in files] == [f"{sha}.json", f"{sha}.train.u8", f"{sha}.val.u8"]
    stamps = [f.stat().st_mtime_ns for f in files]
    events = []
    train(open_corpus([str(path)]), out, {}, TrainConfig(), resume=True, budget_overrides={"max_steps": 8},
          on_progress=lambda kind, info: events.append((kind, info)))
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert [info["cached"] for kind, info in events if kind == "tokenized"] == [True]
    assert {info["stage"] for kind, info in events if kind == "tokenize"} == {"hashing"}

    path.write_text(make_songs(30, seed=9), encoding="utf-8")  # new text: a new model from this one (--from)
    train(open_corpus([str(path)]), tmp_path / "m2", {}, small_config(max_steps=10), base=out)
    new_sha = read_corpus([str(path)]).sha256
    assert sorted(f.name for f in (tmp_path / "m2" / "tokens").iterdir()) == [
        f"{new_sha}.json", f"{new_sha}.train.u8", f"{new_sha}.val.u8"]
    assert [f.stat().st_mtime_ns for f in files] == stamps  # the base's cache is left alone


def old_batches(data: torch.Tensor, stream: BatchStream, windows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches as the earlier BatchStream made them: each epoch's rows gathered whole, then sliced."""
    out = []
    for w in range(windows):
        epoch, window = divmod(w, stream.windows_per_epoch)
        g = torch.Generator().manual_seed(stream.seed * 1_000_003 + epoch)
        offset = int(torch.randint(0, stream.room + 1, (1,), generator=g))
        rows = data[offset + torch.arange(stream.batch_size).unsqueeze(1) * stream.cols + torch.arange(stream.cols + 1)]
        start = window * stream.seq_len
        x, y = rows[:, start : start + stream.seq_len], rows[:, start + 1 : start + 1 + stream.seq_len]
        out.append((stream.my_rows(x, dim=0), stream.my_rows(y, dim=0)))
    return out


@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
def test_memmapped_batches_equal_the_in_memory_ones(tmp_path, shard):
    text = make_songs(40)
    _, got, _ = build(Corpus(text, ["-"], "utf-8"), tmp_path)
    reference = torch.from_numpy(np.array(got.train, dtype=np.int64))
    stream = BatchStream(got.train, 4, 16, seed=5, shard=shard)
    windows = stream.windows_per_epoch * 2 + 1
    for x_want, y_want in old_batches(reference, stream, windows):
        x, y, _ = stream.next()
        assert x.dtype == torch.int64 and torch.equal(x, x_want) and torch.equal(y, y_want)


def test_training_from_files_equals_training_from_text(tmp_path):
    path = tmp_path / "songs.txt"
    path.write_text(make_songs(30), encoding="utf-8")
    a = train(open_corpus([str(path)]), tmp_path / "a", TINY, small_config())
    b = train(read_corpus([str(path)]), tmp_path / "b", TINY, small_config())
    assert a.best_val_loss == b.best_val_loss
    wa = torch.load(tmp_path / "a" / "trainer.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "trainer.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
