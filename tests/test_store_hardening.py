"""Hardening, round 3 (the model store, text that is not Unicode, answers cut or wrong without a word).

Each test names the item of the issue it covers. The server's items are in test_server_hardening.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import rnngen
from rnngen.cli import app
from rnngen.errors import RnngenError

ROOT = Path(__file__).resolve().parents[1]


def one_line(result, code: int = 1) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("train.lock", "tokens"))
    return dst


# ---- 1. rm never reaches through a link ----------------------------------------------------------


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_rm_of_a_linked_model_removes_the_link_only(runner, trained_dir, tmp_path, model_home):
    target = copy_model(trained_dir, tmp_path / "elsewhere" / "realmodel")
    before = sorted(p.name for p in target.iterdir())
    model_home.mkdir(parents=True, exist_ok=True)
    (model_home / "linked").symlink_to(target, target_is_directory=True)
    result = runner.invoke(app, ["rm", "linked", "--yes"])
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr and "link" in result.stderr
    assert not (model_home / "linked").exists() and not (model_home / "linked").is_symlink()
    assert sorted(p.name for p in target.iterdir()) == before  # nothing in the link's target was touched


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_rm_never_follows_a_linked_file_inside_a_model(runner, trained_dir, tmp_path, model_home):
    model = copy_model(trained_dir, model_home / "m")
    precious = tmp_path / "precious.safetensors"
    precious.write_bytes(b"mine")
    (model / "novelty.safetensors").unlink(missing_ok=True)
    (model / "novelty.safetensors").symlink_to(precious)
    assert runner.invoke(app, ["rm", "m", "--yes"]).exit_code == 0
    assert precious.read_bytes() == b"mine"


# ---- 8. text that is not valid Unicode -----------------------------------------------------------


def test_seed_with_undecodable_bytes_is_one_error_line(trained_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LC_ALL": "C.UTF-8"}
    for extra in ([], ["--json"]):
        proc = subprocess.run([sys.executable, "-m", "rnngen", "sample", "--model", str(trained_dir), "--seed",
                               os.fsdecode(b"\xff\xfeab"), "--length", "5", *extra],
                              capture_output=True, env=env, timeout=120)
        err = proc.stderr.decode("utf-8", "replace")
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert err.strip().startswith("Error:") and "UTF-8" in err and len(err.strip().splitlines()) == 1


def test_interactive_line_with_undecodable_bytes_is_reported_and_the_session_goes_on(trained_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LC_ALL": "C.UTF-8"}
    proc = subprocess.run([sys.executable, "-m", "rnngen", "sample", "--model", str(trained_dir), "-i", "--json",
                           "--length", "5", "--random-seed", "1"], input=b"\xff\xfeab\n\xe6\x98\xa5\n",
                          capture_output=True, env=env, timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "UTF-8" in err
    answers = [json.loads(line) for line in proc.stdout.decode().splitlines() if line.strip()]
    assert len(answers) == 1 and answers[0]["text"].startswith("春")


def test_library_refuses_lone_surrogates_with_an_rnngen_error(trained_dir):
    model = rnngen.load(trained_dir, device="cpu")
    with pytest.raises(RnngenError, match="not valid Unicode"):
        model.score("\ud800abc")
    with pytest.raises(RnngenError, match="not valid Unicode"):
        model.generate("\udcff", length=3)
    with pytest.raises(RnngenError, match="not valid Unicode"):
        model.generate(acrostic="\ud800", line_length=3)


# ---- 9. a damaged config.json --------------------------------------------------------------------


DAMAGES = {
    "model is null": lambda m: m.update(model=None),
    "hidden_size is a string": lambda m: m["model"].update(hidden_size="big"),
    "result is a list": lambda m: m.update(result=[1, 2]),
    "corpus sources is a number": lambda m: m["corpus"].update(sources=5),
    "train is a string": lambda m: m.update(train="fast"),
    "deep nesting": lambda m: m.update(result="DEEP"),
    "song_memory full is text": lambda m: m.update(song_memory={"full": "x", "base": []}),
    "tokenizer is a number": lambda m: m.update(tokenizer=3),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_config_is_listed_as_damaged_and_loading_it_is_one_line(runner, trained_dir, model_home, damage):
    copy_model(trained_dir, model_home / "good")
    bad = copy_model(trained_dir, model_home / "bad")
    meta = json.loads((bad / "config.json").read_text(encoding="utf-8"))
    DAMAGES[damage](meta)
    text = json.dumps(meta).replace('"DEEP"', "[" * 100_000 + "]" * 100_000)
    (bad / "config.json").write_text(text, encoding="utf-8")

    listed = runner.invoke(app, ["models", "--json"])
    assert listed.exit_code == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert "error" not in rows["good"] and "damaged" in rows["bad"]["error"]
    table = runner.invoke(app, ["models"])
    assert table.exit_code == 0 and "Traceback" not in table.stderr and "good" in table.stdout
    for args in (["info", "bad"], ["sample", "--model", "bad", "--length", "3"], ["evaluate", "--model", "bad"]):
        assert "damaged" in one_line(runner.invoke(app, args)), args


# ---- 10. no silent cut ---------------------------------------------------------------------------


def test_songs_beyond_the_length_cap_fail_loudly(runner, trained_dir):
    result = runner.invoke(app, ["sample", "--model", str(trained_dir), "--songs", "50", "--length", "60",
                                 "--random-seed", "1"])
    assert result.exit_code != 0
    assert "songs" in result.stderr and "--length" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout  # what was written stays written


def test_lines_default_to_as_many_as_asked(runner, trained_dir):
    result = runner.invoke(app, ["sample", "--model", str(trained_dir), "--lines", "300", "--line-length", "80",
                                 "--random-seed", "2"])
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.rstrip("\n").split("\n")) == 300


def test_line_length_alone_keeps_the_default_length(runner, trained_dir):
    for extra in (["--line-length", "5"], ["--line-length", "5", "--rhyme", "AABB"]):
        result = runner.invoke(app, ["sample", "--model", str(trained_dir), "--random-seed", "3", *extra])
        if result.exit_code == 0:
            counted = len(result.stdout.replace("\n", ""))
            assert counted <= 200, (extra, counted)
        else:  # a char model without rhymable characters may refuse --rhyme: in one line
            one_line(result)


# ---- 11. seeds ----------------------------------------------------------------------------------


def test_seeds_that_would_wrap_are_refused(runner, trained_dir):
    model = rnngen.load(trained_dir, device="cpu")
    assert model.generate(length=5, random_seed=2**32 - 1)  # the largest seed that is used whole
    for seed in (2**32, 2**40, 2**63 - 1):
        with pytest.raises(RnngenError, match="random"):
            model.generate(length=5, random_seed=seed)
        assert "--random-seed" in one_line(runner.invoke(app, ["sample", "--model", str(trained_dir),
                                                               "--random-seed", str(seed)]), 2)


# ---- 12. the figure models shows is the figure evaluate gives ------------------------------------


def test_models_shows_what_evaluate_gives(runner, songs_file, tmp_path):
    from conftest import TINY_FLAGS

    out = tmp_path / "m"
    trained = runner.invoke(app, ["train", str(songs_file), "--out", str(out), "--max-steps", "10", *TINY_FLAGS])
    assert trained.exit_code == 0, trained.stderr
    shown = json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)
    evaluated = json.loads(runner.invoke(app, ["evaluate", "--model", str(out), "--json", "--precision", "fp32"]).stdout)
    assert shown["val_bpc"] == pytest.approx(evaluated["bits_per_char"], abs=2e-3)
    assert shown["val_bpc_network"] == pytest.approx(evaluated["bits_per_char_network"], abs=2e-3)


def test_models_labels_an_older_training_time_figure(runner, trained_dir, model_home):
    old = copy_model(trained_dir, model_home / "old")
    meta = json.loads((old / "config.json").read_text(encoding="utf-8"))
    meta["result"].pop("heldout", None)
    meta["result"]["val_bpc"] = 1.234
    (old / "config.json").write_text(json.dumps(meta), encoding="utf-8")
    row = json.loads(runner.invoke(app, ["info", "old", "--json"]).stdout)
    assert row["val_bpc"] == 1.234 and row["val_bpc_source"] == "training"
    table = runner.invoke(app, ["models"])
    assert "1.234*" in table.stdout and "*" in table.stderr + table.stdout


# ---- 13. messages -------------------------------------------------------------------------------


def test_rm_of_a_bad_name_does_not_mention_name_option(runner):
    line = one_line(runner.invoke(app, ["rm", "..", "--yes"]), 2)
    assert "--name" not in line and "'..'" in line


@pytest.mark.parametrize("kind", ["file", "broken link"])
def test_export_onto_a_file_or_broken_link_says_what_is_there(runner, trained_dir, tmp_path, kind):
    out = tmp_path / "target"
    if kind == "file":
        out.write_text("mine")
    else:
        if os.name == "nt":
            pytest.skip("symlinks need privileges on Windows")
        out.symlink_to(tmp_path / "nowhere")
    line = one_line(runner.invoke(app, ["export", str(trained_dir), "--out", str(out)]), 2)
    assert ("is a file" if kind == "file" else "link") in line and "not empty" not in line
    if kind == "file":
        assert out.read_text() == "mine"


def test_library_type_errors_are_rnngen_errors(tmp_path):
    with pytest.raises(RnngenError, match="path"):
        rnngen.train(b"x.txt")
    with pytest.raises(RnngenError, match="name or a path"):
        rnngen.load(5)


def test_evaluate_of_many_files_names_them_briefly(runner, trained_dir, tmp_path):
    files = []
    for i in range(60):
        p = tmp_path / f"song{i:03d}.txt"
        p.write_text("春风吹过山岗\n我在等你回来\n", encoding="utf-8")
        files.append(str(p))
    result = runner.invoke(app, ["evaluate", "--model", str(trained_dir), *files, "--json"])
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["source"]) < 300
    table = runner.invoke(app, ["evaluate", "--model", str(trained_dir), *files])
    assert table.exit_code == 0 and "song059" not in table.stdout and "60 files" in table.stdout, table.stdout


def _runs(n: int, steps=(10, 20, 30)):
    from rnngen.plot import Run

    return [Run(f"run{i:02d}", [{"step": s, "elapsed": s * 2.0, "train_loss": 3.0 - i * 0.01 - s * 0.001,
                                 "val_bpc": 4.0 - i * 0.01 - s * 0.001, "saved": True} for s in steps])
            for i in range(n)]


def test_plot_of_fifty_runs_keeps_every_legend_entry_on_the_figure_in_its_own_colour(recwarn):
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_hex

    from rnngen.plot import figure

    fig = figure(_runs(50))
    fig.canvas.draw()
    legend = fig.legends[0] if fig.legends else fig.axes[0].get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert [f"run{i:02d}" for i in range(50)] == [x for x in labels if x.startswith("run")]
    colours = {to_hex(h.get_color()) for h in legend.legend_handles if h.get_label().startswith("run")}
    assert len(colours) == 50
    box, page = legend.get_window_extent(), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 <= box.y0 and box.y1 <= page.y1 + 1
    # (a ResourceWarning is another test's pipe collected while matplotlib ran, not the figure's)
    assert not [w for w in recwarn if not issubclass(w.category, ResourceWarning)
                and ("matplotlib" in str(w.filename) or "layout" in str(w.message))], [str(w.message) for w in recwarn]


def test_text_chart_of_huge_steps_keeps_short_labels():
    from rnngen.plot import text_chart

    chart = text_chart(_runs(2, steps=(1, 1e300, 1e308)))
    assert max(len(line) for line in chart.splitlines()) < 120
    assert "e+308" in chart


def test_rm_also_forgets_the_models_cached_ngram_tables(runner, trained_dir, model_home):
    from rnngen.ngram import KneserNey, cache_dir

    model = copy_model(trained_dir, model_home / "m")
    KneserNey.load(model, json.loads((model / "config.json").read_text())["model"]["vocab_size"])
    assert list(cache_dir().glob("*-v*"))
    assert runner.invoke(app, ["rm", "m", "--yes"]).exit_code == 0
    assert not list(cache_dir().glob("*-v*"))
