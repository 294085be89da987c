"""Training curves from each model's metrics.jsonl: a PNG (matplotlib, optional) or a text chart."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rnngen.layout import METRICS_FILE
from rnngen.errors import ModelError, UsageError
from rnngen.files import atomic_write

GLYPHS = "*o+x#@%&"  # one per run in the text chart, repeated after eight runs
CHART_WIDTH, CHART_HEIGHT = 60, 13  # plot area of the text chart, in characters
FIGSIZE, DPI = (10.0, 7.0), 100  # the PNG is 1000 x 700 pixels (taller when the legend has many runs)
LEGEND_ROW = 0.22  # inches per legend row
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Run:
    """One model directory's validation records, in the order training logged them."""

    label: str
    records: list[dict[str, Any]]

    def series(self, key: str, x: str = "step") -> list[tuple[float, float]]:
        """(x, value) for every record that has a finite `key` and `x`."""
        return [(r[x], r[key]) for r in self.records if _finite(r.get(x)) and _finite(r.get(key))]

    @property
    def has_validation(self) -> bool:
        return bool(self.series("val_bpc"))

    @property
    def best(self) -> dict[str, Any] | None:
        """The record of the best checkpoint: the last one saved, else the lowest val_bpc."""
        saved = [r for r in self.records if r.get("saved") is True]
        if saved:
            return saved[-1]
        scored = [r for r in self.records if _finite(r.get("val_bpc"))]
        return min(scored, key=lambda r: r["val_bpc"]) if scored else None


def plot_runs(directories: list[Path], out: Path | None) -> str:
    """Draw each directory's curves to `out` (a PNG; returns its path) or as a text chart (returned)."""
    if out is not None:
        _check_out(out)
    runs = [Run(label, read_metrics(d)) for label, d in zip(_labels(directories), directories)]
    if out is None:
        return text_chart(runs)
    atomic_write(out, _png(runs))
    return f"{out}\n"


def read_metrics(directory: Path) -> list[dict[str, Any]]:
    """The records of `directory`/metrics.jsonl; blank and torn lines (a killed run) are skipped."""
    path = directory / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise ModelError(f"{directory} has no training curves ({METRICS_FILE}); only a model trained with "
                         f"'rnngen train' logs them") from None
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # blank, or torn by a kill
        if isinstance(record, dict) and _finite(record.get("step")) and _finite(record.get("train_loss")):
            records.append(record)
    if not records:
        raise ModelError(f"{path} has no validation records yet; training logs one every --eval-every steps")
    return records


def text_chart(runs: list[Run]) -> str:
    """Validation bits/char (training loss without a validation split) against step, one glyph per run."""
    key, title = ("val_bpc", "validation bits/char") if any(r.has_validation for r in runs) \
        else ("train_loss", "training loss (nats/token)")
    points = [r.series(key) for r in runs]
    xs = [x for p in points for x, _ in p]
    ys = [y for p in points for _, y in p]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = _padded(min(ys), max(ys))
    grid = [[" "] * CHART_WIDTH for _ in range(CHART_HEIGHT)]
    for glyph, series in zip(_glyphs(len(runs)), points):
        for col, y in _columns(series, x_lo, x_hi):
            grid[_row(y, y_lo, y_hi)][col] = glyph

    labels = {row: _number(y_hi - row * (y_hi - y_lo) / (CHART_HEIGHT - 1), y_hi - y_lo)
              for row in (0, (CHART_HEIGHT - 1) // 3, 2 * (CHART_HEIGHT - 1) // 3, CHART_HEIGHT - 1)}
    margin = max(len(s) for s in labels.values())
    lines = [f"{title} against step"]
    for row, cells in enumerate(grid):
        lines.append(f"{labels.get(row, ''):>{margin}} {'+' if row in labels else '|'}{''.join(cells).rstrip()}")
    lines.append(" " * margin + " +" + "-" * CHART_WIDTH)
    lines.append(" " * (margin + 2) + _x_axis(x_lo, x_hi))
    lines.extend(_legend(glyph, run) for glyph, run in zip(_glyphs(len(runs)), runs))
    return "\n".join(lines) + "\n"


def _legend(glyph: str, run: Run) -> str:
    best, last = run.best, run.records[-1]
    if run.has_validation and best is not None and _finite(best.get("val_bpc")):
        where = f"best {_figure(best['val_bpc'])} bits/char at step {_figure(best['step'], 0)}"
    elif best is not None:
        where = f"no validation split; last checkpoint at step {_figure(best['step'], 0)}"
    else:
        where = "no checkpoint saved"
    return f"  {glyph} {run.label}: {where}; last train loss {_figure(last['train_loss'])}"


def _columns(series: list[tuple[float, float]], x_lo: float, x_hi: float) -> list[tuple[int, float]]:
    """(column, value) for each point, joined by straight lines so a few validations still read as a curve."""
    def col(x: float) -> int:
        return round((x - x_lo) / (x_hi - x_lo) * (CHART_WIDTH - 1)) if x_hi > x_lo else 0

    cells = [(col(x), y) for x, y in series]
    joined = cells[:1]
    for (c0, y0), (c1, y1) in zip(cells, cells[1:]):
        joined.extend((c, y0 + (y1 - y0) * (c - c0) / (c1 - c0)) for c in range(c0 + 1, c1 + 1))
        if c1 <= c0:  # x went back or stayed (a log from before a resume): just the point
            joined.append((c1, y1))
    return joined


def _row(y: float, lo: float, hi: float) -> int:
    return round((hi - y) / (hi - lo) * (CHART_HEIGHT - 1))


def _padded(lo: float, hi: float) -> tuple[float, float]:
    """A non-empty y range: a constant curve sits in the middle of the chart."""
    if hi > lo:
        return lo, hi
    pad = max(abs(lo) * 0.05, 0.05)
    return lo - pad, hi + pad


def _figure(value: float, decimals: int = 4) -> str:
    """A legend's figure: fixed decimals, or 4 significant digits when huge (a damaged log)."""
    return f"{value:.{decimals}f}" if abs(value) < 1e9 else f"{value:.4g}"


def _number(value: float, span: float) -> str:
    """Enough decimals to tell the axis labels (a third of `span` apart) from each other."""
    if abs(value) >= 1e6 or span >= 1e6:  # a huge value (a damaged log): short, not hundreds of digits
        return f"{value:.4g}"
    decimals = min(4, max(0, 1 - math.floor(math.log10(span / 3)))) if span > 0 else 2
    return f"{value:.{decimals}f}"


def _x_axis(lo: float, hi: float) -> str:
    """Step labels at the left end, middle and right end of the axis."""
    line = [" "] * CHART_WIDTH
    marks = [(0, lo, "left")] if hi <= lo else [(0, lo, "left"), (CHART_WIDTH // 2, (lo + hi) / 2, "center"),
                                                  (CHART_WIDTH - 1, hi, "right")]
    for col, value, align in marks:
        text = f"{value:.0f}" if abs(value) < 1e9 else f"{value:.3g}"  # never a 300-digit label
        start = {"left": col, "center": col - len(text) // 2, "right": col - len(text) + 1}[align]
        line[start:start + len(text)] = text
    return "".join(line).rstrip()


def _glyphs(n: int) -> list[str]:
    return [GLYPHS[i % len(GLYPHS)] for i in range(n)]


def _labels(directories: list[Path]) -> list[str]:
    """Each run's directory name; the full path where two runs share a name."""
    names = [d.name or str(d) for d in directories]
    return [str(d) if names.count(n) > 1 else n for n, d in zip(names, directories)]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_out(out: Path) -> None:
    """Write only PNGs, and never over a file that is not one (a user's files are sacred)."""
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out writes a PNG; give a file name ending in .png, not {out}")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name ending in .png")
    if out.exists():
        try:
            with out.open("rb") as f:
                is_png = f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
        except OSError as exc:
            raise ModelError(f"cannot read {out}: {exc.strerror or exc}") from None
        if not is_png:
            raise UsageError(f"{out} exists and is not a PNG; refusing to overwrite it")


def _png(runs: list[Run]) -> bytes:
    fig = figure(runs)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def figure(runs: list[Run]) -> Any:
    """A 2 x 2 matplotlib figure: (training loss, validation bits/char) against (step, minutes of
    training), one colour per run, the legend below the plots (the figure grows with it)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
        from matplotlib.lines import Line2D
    except ModuleNotFoundError:
        raise UsageError("--out needs matplotlib: pip install 'rnngen[plot]'") from None

    columns = min(4, max(1, math.ceil((len(runs) + 1) / 6)))  # legend columns; a row is LEGEND_ROW inches
    rows_extra = max(0, math.ceil((len(runs) + 1) / columns) - 3) * LEGEND_ROW
    fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] + rows_extra), dpi=DPI, layout="constrained")
    axes = fig.subplots(2, 2, sharex="col")
    colours = _colours(len(runs))
    rows = (("train_loss", "training loss (nats/token)"), ("val_bpc", "validation bits/char"))
    cols = (("step", "step", 1.0), ("elapsed", "training time (minutes)", 60.0))
    for r, (key, ylabel) in enumerate(rows):
        for c, (x, xlabel, scale) in enumerate(cols):
            ax = axes[r][c]
            for i, run in enumerate(runs):
                series = run.series(key, x)
                if not series:
                    continue
                color = colours[i]
                ax.plot([p[0] / scale for p in series], [p[1] for p in series], color=color, marker=".")
                best = run.best
                if best is not None and _finite(best.get(key)) and _finite(best.get(x)):
                    ax.plot([best[x] / scale], [best[key]], marker="*", markersize=14, color=color, linestyle="none")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if r == len(rows) - 1:
                ax.set_xlabel(xlabel)
            if not ax.lines:
                no_val = key == "val_bpc" and not any(run.has_validation for run in runs)
                ax.text(0.5, 0.5, "no validation split" if no_val else "not logged", ha="center", va="center", transform=ax.transAxes)
    handles = [Line2D([], [], color=colours[i], label=run.label) for i, run in enumerate(runs)]
    handles.append(Line2D([], [], color="black", marker="*", markersize=12, linestyle="none", label="best checkpoint"))
    fig.legend(handles=handles, loc="outside lower center", ncols=columns, fontsize="small" if len(runs) > 9 else None)
    return fig


def _colours(n: int) -> list[Any]:
    """n colours that differ: matplotlib's ten, then evenly spaced hues of a perceptual map."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    from matplotlib import colormaps

    cmap = colormaps["turbo"]
    return [cmap(0.05 + 0.9 * i / (n - 1)) for i in range(n)]
