"""Tokenizers behind one small interface: `char` (one code point per token) and `spm` (SentencePiece)."""

from __future__ import annotations

import codecs
import io
import json
import re
from pathlib import Path
from typing import Iterable, Protocol

import torch

from rnngen.errors import CorpusError, ModelError
from rnngen.files import atomic_write
from rnngen.layout import CHAR_FILE, CONFIG_FILE, SPM_FILE

UNK, EOS = "<unk>", "<eos>"


class StreamDecoder(Protocol):
    def push(self, token_id: int) -> str: ...


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    unk_id: int
    eos_id: int  # end of song: separates documents, stops sampling

    def encode(self, text: str) -> list[int]: ...
    def encode_songs(self, songs: list[str]) -> "torch.Tensor": ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def missing(self, text: str) -> set[str]: ...
    def stream_decoder(self) -> StreamDecoder: ...
    def save(self, directory: Path) -> None: ...


def newline_id(tokenizer: Tokenizer) -> int | None:
    """The line break's token, when "\\n" is one token of its own (else None)."""
    ids = list(tokenizer.encode("\n"))
    return ids[0] if len(ids) == 1 else None


class CharTokenizer:
    """One Unicode code point per token; id 0 is unknown, id 1 is end of song."""

    kind = "char"
    unk_id, eos_id = 0, 1

    def __init__(self, chars: list[str]):
        self.itos = [UNK, EOS, *chars]
        self.stoi = {c: i for i, c in enumerate(self.itos) if i >= 2}
        self.vocab_size = len(self.itos)
        codes = torch.tensor([ord(c) for c in chars], dtype=torch.int32)
        order = torch.argsort(codes)
        self._sorted_codes, self._sorted_ids = codes[order], order + 2  # for vectorised encoding

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen = torch.unique(torch.cat([codepoints(t) for t in texts] or [codepoints("")]))
        return cls([chr(c) for c in seen.tolist() if c != 0])

    def extended(self, chars: Iterable[str]) -> "CharTokenizer":
        """This vocabulary with the characters of `chars` it lacks appended, in their order: every old
        character keeps its id (train --from grows a model's vocabulary this way)."""
        new = [c for c in dict.fromkeys(chars) if c not in self.stoi and c not in (UNK, EOS)]
        return CharTokenizer([*self.itos[2:], *new])

    def encode(self, text: str) -> list[int]:
        get = self.stoi.get
        return [get(c, 0) for c in text]

    def encode_songs(self, songs: list[str]) -> "torch.Tensor":
        """song, eos, song, eos, ... as int64, without a Python step per character."""
        cps = codepoints("\0".join(songs) + "\0")  # NUL never occurs in a corpus: it marks song ends
        if not len(self._sorted_codes):
            return torch.where(cps == 0, self.eos_id, self.unk_id).long()
        pos = torch.searchsorted(self._sorted_codes, cps).clamp_(max=len(self._sorted_codes) - 1)
        ids = torch.where(self._sorted_codes[pos] == cps, self._sorted_ids[pos], self.unk_id)
        ids[cps == 0] = self.eos_id
        return ids.long()

    def decode(self, ids: Iterable[int]) -> str:
        itos = self.itos
        return "".join("\n\n" if i == 1 else itos[i] if i > 1 else "" for i in ids)

    def missing(self, text: str) -> set[str]:
        return {c for c in text if c not in self.stoi}

    def stream_decoder(self) -> "_CharStream":
        return _CharStream(self)

    def save(self, directory: Path) -> None:
        data = json.dumps({"kind": "char", "chars": self.itos[2:]}, ensure_ascii=False)
        atomic_write(directory / CHAR_FILE, data.encode("utf-8"))

    @classmethod
    def load(cls, directory: Path) -> "CharTokenizer":
        path = directory / CHAR_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            chars = data["chars"]
            if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
                raise ValueError("chars must be a list of single characters")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"cannot read tokenizer {path}: {exc}") from None
        return cls(chars)


def codepoints(text: str) -> "torch.Tensor":
    """The text's Unicode code points as int32, without a Python step per character."""
    raw = bytearray(text.encode("utf-32-le"))
    return torch.frombuffer(raw, dtype=torch.int32) if raw else torch.empty(0, dtype=torch.int32)


class _CharStream:
    def __init__(self, tok: CharTokenizer):
        self.tok = tok

    def push(self, token_id: int) -> str:
        return self.tok.decode((token_id,))


META = "\u2581"  # ▁, SentencePiece's whitespace mark


class SpmTokenizer:
    """SentencePiece BPE/unigram with byte fallback, so any text encodes; text round-trips exactly."""

    kind = "spm"

    def __init__(self, proto: bytes):
        import sentencepiece as spm

        self.proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self.sp.get_piece_size()
        self.unk_id, self.eos_id = self.sp.unk_id(), self.sp.eos_id()
        # SentencePiece reads "▁" in a text as its own word-boundary mark and decodes it as a space:
        # a literal one is written as its UTF-8 byte pieces instead (byte fallback), which decode to it
        self._meta = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in META.encode("utf-8")]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "bpe") -> "SpmTokenizer":
        import sentencepiece as spm

        lines = [line for text in texts for line in text.split("\n") if line]
        if not lines:
            raise CorpusError("cannot train a SentencePiece tokenizer on an empty corpus")
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                model_type=model_type, byte_fallback=True, character_coverage=0.9995,
                normalization_rule_name="identity", add_dummy_prefix=False,
                remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                user_defined_symbols=["\n"], unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
                split_digits=True, max_sentence_length=1 << 16, num_threads=2, minloglevel=2,
                hard_vocab_limit=False,  # a small corpus may support fewer pieces than asked for
            )
        except RuntimeError as exc:
            needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(exc))
            if needed:  # 256 byte pieces plus the corpus's common characters must fit
                raise CorpusError(f"--vocab-size {vocab_size} is too small for this corpus; use at least {needed[1]}") from None
            raise CorpusError(f"SentencePiece training failed: {str(exc).strip()[:300]}") from None
        return cls(buf.getvalue())

    def encode(self, text: str) -> list[int]:
        if META not in text:
            return self.sp.encode(text)
        ids: list[int] = []
        for k, part in enumerate(text.split(META)):
            ids += (self._meta if k else []) + (self.sp.encode(part) if part else [])
        return ids

    def encode_songs(self, songs: list[str]) -> "torch.Tensor":
        ids: list[int] = []
        for song, piece in zip(songs, self.sp.encode(songs)):
            ids.extend(self.encode(song) if META in song else piece)
            ids.append(self.eos_id)
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Iterable[int]) -> str:
        out, run = [], []
        for i in ids:  # eos is a control piece that spm drops: render it as a song break
            if i == self.eos_id:
                out.append(self.sp.decode(run) + "\n\n")
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def missing(self, text: str) -> set[str]:
        return set()  # byte fallback covers every character

    def stream_decoder(self) -> "_SpmStream":
        return _SpmStream(self)

    def save(self, directory: Path) -> None:
        atomic_write(directory / SPM_FILE, self.proto)

    @classmethod
    def load(cls, directory: Path) -> "SpmTokenizer":
        path = directory / SPM_FILE
        try:
            return cls(path.read_bytes())
        except (OSError, RuntimeError) as exc:
            raise ModelError(f"cannot read tokenizer {path}: {exc}") from None


class _SpmStream:
    """Turns ids into text one at a time; byte pieces are held until they form a whole character."""

    def __init__(self, tok: SpmTokenizer):
        self.sp, self.eos_id = tok.sp, tok.eos_id
        self.bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        sp = self.sp
        if sp.is_byte(token_id):
            return self.bytes.decode(bytes([int(sp.id_to_piece(token_id)[1:-1], 16)]))
        pending = self.bytes.decode(b"", final=True)
        self.bytes.reset()
        if token_id == self.eos_id:
            return pending + "\n\n"
        if sp.is_control(token_id) or sp.is_unknown(token_id):
            return pending
        return pending + sp.id_to_piece(token_id).replace("\u2581", " ")


def load_tokenizer(kind: str, directory: Path) -> Tokenizer:
    if kind == "char":
        return CharTokenizer.load(directory)
    if kind == "spm":
        return SpmTokenizer.load(directory)
    raise ModelError(f"unknown tokenizer kind {kind!r} in {directory / CONFIG_FILE}")
