"""`rnngen plot`: training curves from synthetic metrics.jsonl files, as a PNG or a text chart."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rnngen.layout import METRICS_FILE
from rnngen.cli import app
from rnngen.plot import CHART_HEIGHT, DPI, FIGSIZE, plot_runs


def make_run(directory: Path, steps: int = 6, *, validation: bool = True, best_at: int = 4, start: float = 3.0,
             constant: bool = False) -> Path:
    """A model directory whose metrics.jsonl logs `steps` validations 50 steps apart; the best is number `best_at`."""
    directory.mkdir(parents=True)
    lines = []
    for i in range(1, steps + 1):
        record = {"step": 50 * i, "epoch": 0.1 * i, "elapsed": 30.0 * i, "lr": 0.002, "chars_per_sec": 9000,
                  "train_loss": start if constant else round(start - 0.1 * i, 4)}
        if validation:
            bpc = start if constant else round(start + 0.5 - 0.2 * min(i, best_at) + 0.05 * max(0, i - best_at), 4)
            record.update(val_loss=round(bpc * 0.69, 4), val_bpc=bpc)
        if i <= best_at or not validation:
            record["saved"] = True
        lines.append(json.dumps(record))
    (directory / METRICS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def plot(runner, *args: str):
    return runner.invoke(app, ["plot", *args])


def chart_rows(stdout: str) -> list[str]:
    """The plot area's rows: every line between the title and the x axis."""
    return stdout.splitlines()[1:1 + CHART_HEIGHT]


def test_text_chart_names_the_run_and_its_best_checkpoint(runner, tmp_path):
    run = make_run(tmp_path / "lstm-small", best_at=4)
    result = plot(runner, str(run))
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert out.splitlines()[0] == "validation bits/char against step"
    # best: the 4th validation (step 200), bpc 3.5 - 0.8 = 2.7; last train loss 3.0 - 0.6 = 2.4
    assert "lstm-small: best 2.7000 bits/char at step 200; last train loss 2.4000" in out
    assert len(out.splitlines()) == 1 + CHART_HEIGHT + 2 + 1  # title, rows, axis, step labels, legend
    assert all(len(line) <= 72 for line in out.splitlines()[:-1]), out  # the chart; the legend holds the name
    assert "\x1b" not in out
    assert " 50" in out.splitlines()[CHART_HEIGHT + 2] and "300" in out.splitlines()[CHART_HEIGHT + 2]


def test_text_chart_draws_the_curve_going_down_then_up(runner, tmp_path):
    run = make_run(tmp_path / "a", steps=8, best_at=4)
    rows = chart_rows(plot(runner, str(run)).stdout)
    lowest = max(i for i, row in enumerate(rows) if "*" in row)
    assert lowest == CHART_HEIGHT - 1  # the minimum sits on the bottom row
    first = min(i for i, row in enumerate(rows) if "*" in row)
    assert rows[first].index("*") < rows[lowest].index("*") < max(row.rfind("*") for row in rows)


def test_two_runs_compared_in_one_chart(runner, tmp_path):
    a = make_run(tmp_path / "gru", steps=8, best_at=6, start=3.0)
    b = make_run(tmp_path / "lstm", steps=4, best_at=3, start=2.0)  # shorter and lower: its own glyph
    result = plot(runner, str(a), str(b))
    assert result.exit_code == 0, result.stderr
    legend = result.stdout.splitlines()[-2:]
    assert legend[0].startswith("  * gru: best 2.3000 bits/char at step 300")
    assert legend[1].startswith("  o lstm: best 1.9000 bits/char at step 150")
    rows = chart_rows(result.stdout)
    assert any("*" in row for row in rows) and any("o" in row for row in rows)
    # the shorter run stops about halfway across: 200 of 50..400 steps
    assert max(row.rfind("o") for row in rows) < 40 < max(row.rfind("*") for row in rows)


def test_without_validation_the_chart_shows_training_loss(runner, tmp_path):
    run = make_run(tmp_path / "noval", validation=False)
    result = plot(runner, str(run))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("training loss (nats/token) against step\n")
    assert "noval: no validation split; last checkpoint at step 300; last train loss 2.4000" in result.stdout


@pytest.mark.parametrize("steps, constant", [(1, False), (5, True), (1, True)])
def test_single_point_and_constant_curves(tmp_path, steps, constant):
    run = make_run(tmp_path / "m", steps=steps, constant=constant)
    text = plot_runs([run], None)
    rows = text.splitlines()[1:1 + CHART_HEIGHT]
    assert sum(row.count("*") for row in rows) >= 1
    assert all(len(line) <= 72 for line in text.splitlines()[:-1])


def test_truncated_last_line_and_blank_lines_are_skipped(runner, tmp_path):
    run = make_run(tmp_path / "killed", steps=4, best_at=4)
    with (run / METRICS_FILE).open("a", encoding="utf-8") as f:
        f.write('\n\n{"step": 9950, "epoch": 9.9, "elapsed": 1234.5, "train_lo')  # the process died mid-line
    result = plot(runner, str(run))
    assert result.exit_code == 0, result.stderr
    assert "9950" not in result.stdout
    assert "killed: best 2.7000 bits/char at step 200" in result.stdout


def test_png_written_at_figure_size(runner, tmp_path):
    from matplotlib.image import imread

    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", validation=False)
    out = tmp_path / "curves.png"
    result = plot(runner, str(a), str(b), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n" and result.stderr == ""
    pixels = imread(out)
    assert pixels.shape[:2] == (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI))
    assert pixels.std() > 0  # something was drawn
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    # an existing PNG is replaced
    assert plot(runner, str(a), "--out", str(out)).exit_code == 0


def test_missing_metrics_is_one_error_line(runner, tmp_path):
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "config.json").write_text("{}", encoding="utf-8")
    result = plot(runner, str(make_run(tmp_path / "ok")), str(exported))
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(exported) in lines[0]
    assert "metrics.jsonl" in lines[0]


def test_metrics_without_records_is_an_error(runner, tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / METRICS_FILE).write_text('\n{"step": 5', encoding="utf-8")
    result = plot(runner, str(run))
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and "no validation records" in result.stderr


def test_missing_matplotlib_is_one_error_line(runner, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... now fails as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "curves.png"
    result = plot(runner, str(make_run(tmp_path / "a")), "--out", str(out))
    assert result.exit_code == 2
    assert result.stderr == "Error: --out needs matplotlib: pip install 'rnngen[plot]'\n"
    assert not out.exists()
    # the text chart needs nothing beyond the standard library
    assert plot(runner, str(tmp_path / "a")).exit_code == 0


@pytest.mark.parametrize("name, content", [("curves.pdf", None), ("notes.txt", b"my notes"),
                                           ("photo.png", b"not a png")])
def test_out_refuses_other_files(runner, tmp_path, name, content):
    out = tmp_path / name
    if content is not None:
        out.write_bytes(content)
    result = plot(runner, str(make_run(tmp_path / "a")), "--out", str(out))
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1
    if content is None:
        assert not out.exists()
    else:
        assert out.read_bytes() == content  # untouched


def test_runs_with_the_same_name_are_told_apart(tmp_path):
    a, b = make_run(tmp_path / "x" / "model"), make_run(tmp_path / "y" / "model")
    text = plot_runs([a, b], None)
    assert f"* {a}: best" in text and f"o {b}: best" in text


def test_chart_width_is_bounded_for_large_numbers(tmp_path):
    run = tmp_path / "big"
    run.mkdir()
    records = [{"step": 1_000_000 * i, "elapsed": 1e6 * i, "train_loss": 12345.678 / i, "val_bpc": 98765.4321 / i}
               for i in range(1, 4)]
    (run / METRICS_FILE).write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    text = plot_runs([run], None)
    assert all(len(line) <= 72 for line in text.splitlines()[:-1]), text
    assert "3000000" in text.splitlines()[-2]
