"""The training progress shown on stderr: a Rich progress bar fed by train()'s on_progress events,
with a line and a sample preview after each validation."""

from __future__ import annotations

class TrainDisplay:
    """A Rich progress bar on stderr fed by train()'s on_progress events, plus eval lines and previews."""

    def __init__(self, enabled: bool = True):
        from rich.console import Console

        self.enabled = enabled
        self.console = Console(stderr=True, soft_wrap=True)
        self.progress = None
        self.reading = None  # the tokenisation passes' bar, shown before training starts
        self.passes: dict[str, int] = {}
        self.val_bpc = "-"

    def __enter__(self) -> "TrainDisplay":
        return self

    def __exit__(self, *exc) -> None:
        for bar in (self.reading, self.progress):
            if bar is not None:
                bar.__exit__(*exc)

    def _reading(self, info: dict) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        if self.reading is None:  # transient: an error mid-pass leaves only its one line
            self.reading = Progress(
                TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                TextColumn("{task.fields[mb]} MB"), TextColumn("{task.fields[speed]} MB/s"), TimeElapsedColumn(),
                console=self.console, transient=True,
            )
            self.reading.__enter__()
        stage = info["stage"]
        if stage not in self.passes:
            self.passes[stage] = self.reading.add_task(f"{stage} corpus", total=max(1, info["total_bytes"]), mb="-", speed="-")
        self.reading.update(self.passes[stage], completed=info["done_bytes"], mb=f"{info['done_bytes'] / 1e6:,.1f}",
                            speed=f"{info['mb_per_sec']:,.1f}")

    def update(self, kind: str, info: dict) -> None:
        if not self.enabled:
            return
        if kind == "info":
            self.console.print(info["message"], style="dim")
        elif kind == "tokenize":
            self._reading(info)
        elif kind == "tokenized":
            if self.reading is not None:
                self.reading.__exit__(None, None, None)
                self.reading = None
            mb, seconds = info["bytes"] / 1e6, info["seconds"]
            what = "checked the corpus hash and reused its token cache" if info["cached"] else "tokenized the corpus"
            self.console.print(f"{what}: {mb:,.1f} MB in {seconds:.1f} s ({mb / max(seconds, 1e-9):,.1f} MB/s)",
                               style="dim", highlight=False)
        elif kind == "start":
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("step {task.fields[step]}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                TextColumn("loss {task.fields[loss]}"), TextColumn("val {task.fields[bpc]} bpc"),
                TextColumn("{task.fields[cps]} chars/s"), TimeElapsedColumn(), TextColumn("left"),
                TimeRemainingColumn(), console=self.console,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task("train", total=1000, step=0, loss="-", bpc="-", cps="-")
            budget = f"{info['total_steps']} steps" if info["total_steps"] else f"{info['time_limit'] or 0:.0f} s"
            self.console.print(
                f"Training {info['directory']}: {info['params']:,} parameters, vocabulary {info['vocab_size']:,}, "
                f"{info['train_tokens']:,} training tokens, batch {info['batch_size']}x{info['seq_len']}, "
                f"{info['device']} {info['precision']}, budget {budget}"
                + (f", {info['processes']} processes of {info['batch_size'] // info['processes']} streams each "
                   f"(global batch {info['batch_size']}; the learning rate schedule is per global step)"
                   if info["processes"] > 1 else ""), style="dim", highlight=False)
        elif kind == "step":
            self.progress.update(self.task, completed=min(1.0, info["progress"]) * 1000, step=info["step"],
                                 loss=f"{info['train_loss']:.3f}", cps=f"{info['chars_per_sec']:,.0f}", bpc=self.val_bpc)
        elif kind == "eval":
            if "val_bpc" in info:
                self.val_bpc = f"{info['val_bpc']:.3f}"
            saved = " (saved)" if info.get("saved") else ""
            self.console.print(f"step {info['step']}: val {self.val_bpc} bits/char, network alone{saved} | "
                               f"{info['preview']!r}",
                               style="dim", highlight=False, markup=False)
        elif kind == "done":
            self.progress.update(self.task, completed=1000)
