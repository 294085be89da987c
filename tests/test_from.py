"""train --from: a new model that starts from a trained one (a model in the home, a directory, an
exported copy, the bundled songci), its vocabulary grown by the new corpus's characters."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

import rnngen
from rnngen.cli import app
from rnngen.errors import ModelError, UsageError

from conftest import LINES, TINY_FLAGS, make_songs

NEW = "龙飞凤舞雪吟"  # none of these is in conftest.LINES: the base model has never seen them
STEPS = ["--max-steps", "6", "--eval-every", "3"]
FLAGS = TINY_FLAGS[4:]  # without --hidden-size and --embedding-dim: the network is the base's
assert FLAGS[0] == "--batch-size"


def new_songs(n: int = 30, seed: int = 3) -> str:
    """Songs of the base's lines mixed with lines made of characters the base lacks."""
    rng = random.Random(seed)
    pool = LINES + ["龙飞凤舞", "雪里龙吟", "凤舞龙飞雪", "龙吟凤舞"] * 3
    return "\n\n".join("\n".join(rng.choice(pool) for _ in range(rng.randint(4, 8))) for _ in range(n)) + "\n"


@pytest.fixture
def new_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "mine.txt"
    path.write_text(new_songs(), encoding="utf-8")
    return path


def hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def chars(directory: Path) -> list[str]:
    return json.loads((directory / "vocab.json").read_text(encoding="utf-8"))["chars"]


def train_from(runner, corpus: Path, base: Path | str, out: Path, *extra: str):
    return runner.invoke(app, ["train", str(corpus), "--from", str(base), "--out", str(out), *STEPS, *FLAGS, *extra])


def one_error_line(result, codes=(1, 2)) -> str:
    assert result.exit_code in codes, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    assert "Traceback" not in result.stderr and not result.stdout
    return lines[0]


# ---- the vocabulary grows; the old ids stay -------------------------------------------------------

def test_new_characters_get_ids_after_the_old_ones_and_can_be_generated(runner, trained_dir, new_corpus, tmp_path):
    before = hashes(trained_dir)
    out = tmp_path / "grown"
    result = train_from(runner, new_corpus, trained_dir, out)
    assert result.exit_code == 0, result.stderr
    old, grown = chars(trained_dir), chars(out)
    assert grown[: len(old)] == old  # every old character keeps its id
    assert set(grown[len(old):]) == set(NEW)
    tokenizer = rnngen.load(out).loaded.tokenizer
    assert not tokenizer.missing(NEW) and tokenizer.unk_id not in tokenizer.encode(NEW)
    meta = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert meta["model"]["vocab_size"] == len(old) + 2 + len(NEW)
    # a sample can hold them (each is a few per cent of the new text; the new rows start at that frequency)
    sample = runner.invoke(app, ["sample", "--model", str(out), "--length", "300", "--temperature", "1",
                                 "--random-seed", "7"])
    assert sample.exit_code == 0, sample.stderr
    assert set(sample.stdout) & set(NEW), sample.stdout
    assert hashes(trained_dir) == before  # the base is never changed


def test_grown_model_keeps_old_rows_and_starts_from_the_new_frequencies(trained_dir):
    from rnngen.grow import grow_model

    base = rnngen.load(trained_dir).loaded.model
    old = base.config.vocab_size
    counts = torch.zeros(old + 3, dtype=torch.long)
    counts[2:old] = torch.arange(2, old) * 5  # the new text's own frequencies for the old characters
    counts[old:] = torch.tensor([200, 20, 0])  # a frequent new character, a rarer one, one only in validation
    sample = torch.randint(2, old + 2, (4000,))
    grown = grow_model(base, old + 3, counts.numpy(), sample)
    for name, tensor in base.state_dict().items():  # every weight kept; the old tokens keep their rows
        new = grown.state_dict()[name]
        if name in ("embedding.weight", "head.weight"):
            assert torch.equal(new[:old], tensor)
        elif name != "head.bias":
            assert torch.equal(new, tensor)
    embedding = grown.embedding.weight.detach()
    assert torch.allclose(embedding[old:], base.embedding.weight.detach()[2:].mean(0).expand(3, -1))
    # on the new text, every token's average probability starts at its (add-one) frequency there
    with torch.no_grad():
        rows = sample.view(8, -1)
        logits, _, _ = grown(rows)
        mean_p = logits.softmax(-1).mean((0, 1))
    freq = (counts.float() + 1) / (counts.float() + 1).sum()
    assert torch.allclose(mean_p, freq, rtol=0.05)
    assert mean_p[old] > mean_p[old + 1] > mean_p[old + 2]


def test_tokenizer_grows_without_moving_old_ids():
    from rnngen.tokenizer import CharTokenizer

    base = CharTokenizer(list("春风吹"))
    grown = base.extended(list("龙风雪"))  # 风 is already there
    assert grown.itos[: base.vocab_size] == base.itos
    assert grown.itos[base.vocab_size:] == ["龙", "雪"]
    assert grown.encode("春风龙雪") == [2, 3, 5, 6]
    assert grown.encode_songs(["春龙"]).tolist() == [2, 5, grown.eos_id]


# ---- lineage ---------------------------------------------------------------------------------------

def test_lineage_in_config_and_info(runner, trained_dir, new_corpus, model_home):
    result = runner.invoke(app, ["train", str(new_corpus), "--from", str(trained_dir), "--name", "mine", *STEPS, *FLAGS])
    assert result.exit_code == 0, result.stderr
    base_meta = json.loads((trained_dir / "config.json").read_text(encoding="utf-8"))
    meta = json.loads((model_home / "mine" / "config.json").read_text(encoding="utf-8"))
    lineage = meta["from"]
    assert lineage["name"] == trained_dir.name and lineage["corpus_sha256"] == base_meta["corpus"]["sha256"]
    assert lineage["vocab_size"] == base_meta["model"]["vocab_size"] and lineage["new_chars"] == len(NEW)
    assert meta["corpus"]["sha256"] == hashlib.sha256(new_corpus.read_bytes()).hexdigest()
    assert meta["model"]["hidden_size"] == base_meta["model"]["hidden_size"]  # the base's network
    info = runner.invoke(app, ["info", "mine", "--json"])
    assert info.exit_code == 0, info.stderr
    record = json.loads(info.stdout)
    assert record["from"] == trained_dir.name and record["config"]["from"] == lineage
    text = runner.invoke(app, ["info", "mine"])
    assert text.exit_code == 0 and trained_dir.name in text.stdout and "from" in text.stdout
    # an export keeps the lineage but tells no paths
    shared = runner.invoke(app, ["export", "mine", "--out", str(model_home.parent / "shared")])
    assert shared.exit_code == 0, shared.stderr
    exported = json.loads((model_home.parent / "shared" / "config.json").read_text(encoding="utf-8"))
    assert exported["from"]["name"] == trained_dir.name and "path" not in exported["from"]


def test_from_an_exported_copy_and_a_model_in_the_home(runner, trained_dir, new_corpus, model_home, tmp_path):
    shared = tmp_path / "shared"
    assert runner.invoke(app, ["export", str(trained_dir), "--out", str(shared)]).exit_code == 0
    result = train_from(runner, new_corpus, shared, tmp_path / "a")
    assert result.exit_code == 0, result.stderr
    model_home.mkdir(parents=True, exist_ok=True)
    shutil.copytree(trained_dir, model_home / "base")
    result = runner.invoke(app, ["train", str(new_corpus), "--from", "base", "--name", "b", *STEPS, *FLAGS])
    assert result.exit_code == 0, result.stderr
    assert json.loads((model_home / "b" / "config.json").read_text())["from"]["name"] == "base"


# ---- what is refused, and how ----------------------------------------------------------------------

def test_refusals_say_what_to_do(runner, trained_dir, new_corpus, tmp_path, model_home):
    line = one_error_line(train_from(runner, new_corpus, "nosuch", tmp_path / "x"))
    assert "nosuch" in line
    assert not (tmp_path / "x").exists()
    line = one_error_line(train_from(runner, new_corpus, trained_dir, tmp_path / "x", "--tokenizer", "spm"))
    assert "--tokenizer" in line and "--from" in line
    line = one_error_line(train_from(runner, new_corpus, trained_dir, tmp_path / "x", "--hidden-size", "64"))
    assert "--hidden-size" in line and "--from" in line
    # the base itself is never the output, not even with --force
    before = hashes(trained_dir)
    line = one_error_line(train_from(runner, new_corpus, trained_dir, trained_dir, "--force"))
    assert "--from" in line and hashes(trained_dir) == before
    # --resume of a run that did not start from this base
    plain = tmp_path / "plain"
    assert runner.invoke(app, ["train", str(new_corpus), "--out", str(plain), "--max-steps", "2",
                               *TINY_FLAGS]).exit_code == 0
    line = one_error_line(train_from(runner, new_corpus, trained_dir, plain, "--resume"))
    assert "--resume" in line and "--from" in line
    # --fine-tune is gone: it points at --from
    line = one_error_line(runner.invoke(app, ["train", str(new_corpus), "--out", str(plain), "--resume",
                                              "--fine-tune", *TINY_FLAGS]))
    assert "--from" in line
    # resuming on other text points at --from too
    other = tmp_path / "other.txt"
    other.write_text(make_songs(20, seed=5), encoding="utf-8")
    line = one_error_line(runner.invoke(app, ["train", str(other), "--out", str(plain), "--resume", *TINY_FLAGS]))
    assert "--from" in line


def test_spm_base_is_refused(runner, tmp_path, new_corpus):
    corpus = tmp_path / "en.txt"
    corpus.write_text("\n\n".join(f"la la {i} night moon" for i in range(60)), encoding="utf-8")
    base = tmp_path / "spm"
    made = runner.invoke(app, ["train", str(corpus), "--out", str(base), "--max-steps", "2", "--tokenizer", "spm",
                               "--vocab-size", "300", *TINY_FLAGS])
    assert made.exit_code == 0, made.stderr
    line = one_error_line(train_from(runner, new_corpus, base, tmp_path / "x"))
    assert "spm" in line or "SentencePiece" in line


def test_resume_messages_point_at_from(runner, new_corpus, tmp_path, model_home, trained_dir):
    # the bundled model is not in the home: resuming it by name cannot work
    line = one_error_line(runner.invoke(app, ["train", str(new_corpus), "--name", "songci", "--resume", *TINY_FLAGS]))
    assert "--from songci" in line
    # a copy of a model folder without trainer.pt
    copy = tmp_path / "copy"
    shutil.copytree(trained_dir, copy)
    (copy / "trainer.pt").unlink()
    line = one_error_line(runner.invoke(app, ["train", str(new_corpus), "--out", str(copy), "--resume", *TINY_FLAGS]))
    assert "--from" in line


# ---- a stopped --from run resumes ------------------------------------------------------------------

def test_stopped_from_run_resumes_as_if_it_never_stopped(runner, trained_dir, new_corpus, tmp_path):
    from rnngen.api import run_training

    settings = rnngen.TrainConfig.fine_tuning(max_steps=8, eval_every=2, batch_size=4, seq_len=16, warmup_steps=2)
    whole = run_training(new_corpus, tmp_path / "whole", base=str(trained_dir), training=settings, device="cpu")
    assert whole.steps == 8
    calls = []
    stopped = run_training(new_corpus, tmp_path / "part", base=str(trained_dir), training=settings, device="cpu",
                           should_stop=lambda: calls.append(1) or len(calls) >= 3)
    assert stopped.stop_reason == "interrupted" and stopped.steps == 3
    result = runner.invoke(app, ["train", str(new_corpus), "--out", str(tmp_path / "part"), "--resume",
                                 "--threads", "1", "-q", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    part = json.loads((tmp_path / "part" / "config.json").read_text())
    assert part["result"]["steps"] == 8 and part["from"]["name"] == trained_dir.name
    assert chars(tmp_path / "part") == chars(tmp_path / "whole")
    assert (tmp_path / "part" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_from_run_killed_before_its_first_save_starts_again_from_its_base(runner, trained_dir, new_corpus, tmp_path):
    done = tmp_path / "done"
    assert train_from(runner, new_corpus, trained_dir, done).exit_code == 0
    killed = tmp_path / "killed" / ".rnngen-new"  # what a kill before the first save leaves: the staged config
    killed.mkdir(parents=True)
    shutil.copy(done / "config.json", killed / "config.json")
    result = runner.invoke(app, ["train", str(new_corpus), "--out", str(killed.parent), "--resume", *STEPS, *FLAGS])
    assert result.exit_code == 0, result.stderr
    assert chars(killed.parent) == chars(done)
    assert json.loads((killed.parent / "config.json").read_text())["from"]["name"] == trained_dir.name


# ---- the Python API --------------------------------------------------------------------------------

def test_api_train_from_base(trained_dir, new_corpus, tmp_path):
    settings = rnngen.TrainConfig.fine_tuning(max_steps=4, eval_every=2, batch_size=4, seq_len=16)
    assert settings.lr < rnngen.TrainConfig().lr  # fine-tuning starts gentler
    path = rnngen.train(new_corpus, tmp_path / "api", base=trained_dir, training=settings)
    model = rnngen.load(path)
    assert model.config["from"]["name"] == trained_dir.name and not model.unknown_chars(NEW)
    with pytest.raises(ModelError, match="nosuch"):
        rnngen.train(new_corpus, tmp_path / "x", base="nosuch", training=settings)
    with pytest.raises(UsageError, match="base"):
        rnngen.train(new_corpus, tmp_path / "x", base=trained_dir, training=settings,
                     model=rnngen.ModelConfig(hidden_size=64))


# ---- the bundled model ----------------------------------------------------------------------------

def test_from_bundled_songci_leaves_it_unchanged(runner, tmp_path, model_home):
    from rnngen.home import bundled_dir

    bundled = bundled_dir()
    before = hashes(bundled)
    corpus = tmp_path / "pop.txt"
    corpus.write_text("\n\n".join(["OK 我爱你 baby\n你好吗 😀"] * 12) + "\n", encoding="utf-8")
    result = runner.invoke(app, ["train", str(corpus), "--from", "songci", "--name", "pop", "--max-steps", "2",
                                 "--eval-every", "2", "--batch-size", "4", "--seq-len", "16", "--threads", "1", "-q"])
    assert result.exit_code == 0, result.stderr
    assert hashes(bundled) == before
    meta = json.loads((model_home / "pop" / "config.json").read_text(encoding="utf-8"))
    base_meta = json.loads((bundled / "config.json").read_text(encoding="utf-8"))
    assert meta["from"]["name"] == "songci" and meta["from"]["corpus_sha256"] == base_meta["corpus"]["sha256"]
    assert meta["model"]["vocab_size"] > base_meta["model"]["vocab_size"]  # 😀 (at least) is new to songci
    assert chars(model_home / "pop")[: base_meta["model"]["vocab_size"] - 2] == chars(bundled)
    assert not rnngen.load("pop").unknown_chars("😀")


# ---- the network's own figure in the training log --------------------------------------------------

def test_done_line_shows_the_network_alone(runner, songs_file, tmp_path):
    result = runner.invoke(app, ["train", str(songs_file), "--out", str(tmp_path / "m"), "--max-steps", "4",
                                 *TINY_FLAGS])
    assert result.exit_code == 0, result.stderr
    done = [line for line in result.stderr.splitlines() if line.startswith("Done:")]
    assert len(done) == 1 and "network alone" in done[0], result.stderr
    heldout = json.loads((tmp_path / "m" / "config.json").read_text())["result"]["heldout"]
    assert f"{heldout['bits_per_char_network']:.3f}" in done[0] and f"{heldout['bits_per_char']:.3f}" in done[0]


def test_progress_lines_name_the_network_alone():
    import io

    from rich.console import Console

    from rnngen.progress import TrainDisplay

    display = TrainDisplay()
    display.console = Console(file=io.StringIO(), width=200)
    display.update("eval", {"step": 20, "val_bpc": 5.4321, "saved": True, "preview": "春风"})
    assert "step 20: val 5.432 bits/char, network alone (saved)" in display.console.file.getvalue()


def test_a_damaged_lineage_is_one_line(runner, trained_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained_dir, copy)
    meta = json.loads((copy / "config.json").read_text(encoding="utf-8"))
    meta["from"] = {"name": "base", "vocab_size": "many"}
    (copy / "config.json").write_text(json.dumps(meta), encoding="utf-8")
    line = one_error_line(runner.invoke(app, ["info", str(copy)]))
    assert "from.vocab_size" in line
