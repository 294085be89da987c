"""The command line: parses options, calls one library function, writes the product to stdout.

Only this module talks to the terminal. torch is imported inside the commands, so `--help`
stays fast.
"""

from __future__ import annotations

import errno
import io
import itertools
import json
import os
import re
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from enum import Enum
from typing import Annotated, Iterator, List, Optional

import typer
from typer.core import TyperGroup

try:  # recent typer vendors click; older releases use the click package
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError

from rnngen import __version__
from rnngen.config import (DEFAULT_CANDIDATES, DEFAULT_LENGTH, MAX_TOPIC, TOPIC_WEIGHT, DEVICES, MAX_SEED, LR_SCHEDULES, PRECISIONS, RNN_TYPES, SONG_ROOM, SPM_MODEL_TYPES,
                           TOKENIZERS, ModelConfig, SamplingSettings, TrainConfig, check_range)
from rnngen.errors import Incomplete, Interrupted, RnngenError, UsageError

_T, _M, _S = TrainConfig(), ModelConfig(), SamplingSettings()  # the defaults, defined once in config.py


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """An Enum of `values`: --help shows [a|b|c] and shell completion offers them."""
    return Enum(name, {v: v for v in values}, type=str)


Cell, TokenizerKind, SpmType = _choices("Cell", RNN_TYPES), _choices("TokenizerKind", TOKENIZERS), _choices("SpmType", SPM_MODEL_TYPES)
Schedule, Device, Precision = _choices("Schedule", LR_SCHEDULES), _choices("Device", DEVICES), _choices("Precision", PRECISIONS)

def _model_names(incomplete: str) -> list[str]:
    """Shell completion for --model: the names of the models there are."""
    from rnngen.home import all_models

    return [name for name, _ in all_models() if name.startswith(incomplete)]


# options several commands share: one default and one help text
ModelOption = Annotated[Optional[str], typer.Option(
    "--model", "-m", autocompletion=_model_names,
    help="A model's name in the model home (see 'rnngen models'), 'songci' (bundled), or a directory path. "
         "Default: the most recently trained, else the bundled one.")]
DeviceOption = Annotated[Device, typer.Option(
    "--device", help="auto (a CUDA or MPS GPU when there is one, else the CPU), cpu, cuda or mps.")]
PrecisionOption = Annotated[Precision, typer.Option(
    "--precision", help="auto (bf16 on GPUs and on CPUs with AMX/AVX512-BF16, else fp32), fp32, bf16 or fp16 (GPUs).")]
ThreadsOption = Annotated[int, typer.Option("--threads", help="CPU threads for torch (0: torch's default).")]
EncodingOption = Annotated[str, typer.Option("--encoding", help="Text encoding of the input files, e.g. utf-8, gbk, big5, utf-16.")]


class _OneLineErrors(TyperGroup):
    """Usage errors as one line on stderr (click's default is a usage block)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                              standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:  # bare `rnngen`: show the help, not an error
            typer.echo(exc.format_message())
            rv = 0
        except ClickException as exc:
            command = exc.ctx.command_path if getattr(exc, "ctx", None) else "rnngen"
            typer.echo(f"Error: {exc.format_message()} (see '{command} --help')", err=True)
            rv = exc.exit_code
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


app = typer.Typer(
    cls=_OneLineErrors,
    help="Train recurrent-network language models on lyrics (or any UTF-8 text) and generate from them.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rnngen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


def _err(message: str) -> None:
    typer.echo(message, err=True)


@contextmanager
def _errors_to_exit() -> Iterator[None]:
    """Expected failures become one 'Error: ...' line and a non-zero exit; bugs keep their traceback."""
    try:
        yield
    except RnngenError as exc:
        _err(f"Error: {exc}")
        raise typer.Exit(exc.exit_code) from None


def _seconds(value: Optional[str]) -> Optional[float]:
    """'600', '90s', '10m', '1h30m' -> seconds; '0' or 'none' -> no limit."""
    if value is None:
        return None
    text = value.strip().lower()
    if text in ("0", "none", "off", "inf"):
        return 0.0
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s", "", text):
        raise typer.BadParameter(f"{value!r} is not a duration; use e.g. 600, 90s, 10m or 1h30m", param_hint="--time-limit")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def _set_threads(threads: int) -> None:
    check_range("--threads", threads, 0, 4096, integer=True)  # 0: torch's default
    if threads:
        import torch

        torch.set_num_threads(threads)


# ---- train ------------------------------------------------------------------------------------


# the options that shape the network: a model started --from another keeps the base's
NETWORK_OPTIONS = {"rnn_type": "--rnn-type", "layers": "--layers", "hidden_size": "--hidden-size",
                   "embedding_dim": "--embedding-dim", "dropout": "--dropout", "embedding_dropout": "--embedding-dropout",
                   "weight_drop": "--weight-drop", "tie_weights": "--tie-weights"}
BY_SIZE = "[default: chosen from the corpus size]"


@app.command()
def train(
    ctx: typer.Context,
    corpus: List[str] = typer.Argument(..., metavar="CORPUS", help="Text files, directories (their *.txt), or - for stdin."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name: saved as NAME in the model home ($RNNGEN_HOME, else the per-user data directory; see 'rnngen models'). Default: the corpus file's name."),
    out: Optional[Path] = typer.Option(None, "--out", help="Model directory to write, anywhere (instead of NAME in the model home)."),
    base: Optional[str] = typer.Option(None, "--from", metavar="MODEL", autocompletion=_model_names, help="Start from a trained model (a name, 'songci', or a directory; an exported copy will do) instead of random weights: its network, its vocabulary plus the corpus's new characters, a gentler learning rate (--lr 1e-3, halved when validation stalls, --eval-every 20). MODEL itself is never changed."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in the model directory exactly where it stopped (a --from run too)."),
    fine_tune: bool = typer.Option(False, "--fine-tune", hidden=True, help="Gone: use --from."),
    force: bool = typer.Option(False, "--force", help="Start over even if the model directory already holds a model."),
    encoding: EncodingOption = "utf-8",
    tokenizer: TokenizerKind = typer.Option(_T.tokenizer, "--tokenizer", help="char: one Unicode character per token; spm: SentencePiece subwords."),
    vocab_size: int = typer.Option(_T.vocab_size, "--vocab-size", help="spm only: number of subword pieces."),
    spm_model_type: SpmType = typer.Option(_T.spm_model_type, "--spm-model-type", help="spm only: the SentencePiece algorithm."),
    rnn_type: Cell = typer.Option(_M.rnn_type, "--rnn-type", "--cell", help="Recurrent cell: lstm, gru or rnn (tanh). Always unidirectional: a bidirectional RNN sees the future and cannot generate left to right."),
    layers: Optional[int] = typer.Option(None, "--layers", help=f"Number of stacked recurrent layers. {BY_SIZE}", show_default=False),
    hidden_size: Optional[int] = typer.Option(None, "--hidden-size", help=f"Units per recurrent layer. {BY_SIZE}", show_default=False),
    embedding_dim: Optional[int] = typer.Option(None, "--embedding-dim", help=f"Size of the token embedding (tied: the hidden size). {BY_SIZE}", show_default=False),
    dropout: Optional[float] = typer.Option(None, "--dropout", help=f"Dropout on the embedding output, between layers and before the output layer (0 to disable). {BY_SIZE}", show_default=False),
    embedding_dropout: Optional[float] = typer.Option(None, "--embedding-dropout", help=f"Drop whole embedding rows: each token type is blanked for a whole step with this probability (0 to disable). {BY_SIZE}", show_default=False),
    weight_drop: Optional[float] = typer.Option(None, "--weight-drop", help=f"DropConnect on the recurrent hidden-to-hidden weights while training (AWD-LSTM; 0 to disable). {BY_SIZE}", show_default=False),
    tie_weights: Optional[bool] = typer.Option(None, "--tie-weights/--no-tie-weights", help=f"Share the embedding and output matrices (needs --embedding-dim equal to --hidden-size). {BY_SIZE}", show_default=False),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=f"Parallel text streams per step. {BY_SIZE}", show_default=False),
    seq_len: int = typer.Option(_T.seq_len, "--seq-len", help="BPTT window: tokens back-propagated through per step (the state carries on beyond it)."),
    lr: float = typer.Option(_T.lr, "--lr", help="Peak learning rate (AdamW)."),
    weight_decay: float = typer.Option(_T.weight_decay, "--weight-decay", help="AdamW weight decay on weight matrices."),
    warmup_steps: int = typer.Option(_T.warmup_steps, "--warmup-steps", help="Steps of linear learning-rate warm-up."),
    lr_schedule: Schedule = typer.Option(_T.lr_schedule, "--lr-schedule", help="wsd (hold the peak, then a cosine decay over the last 25% of the step/epoch/time budget), cosine (decay over the whole budget), plateau (halve when validation stalls) or constant."),
    grad_clip: float = typer.Option(_T.grad_clip, "--grad-clip", help="Clip the global gradient norm to this."),
    val_fraction: float = typer.Option(_T.val_fraction, "--val-fraction", help="Share of songs held out for validation (0 for none)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help=f"Validate (and checkpoint) every N steps. {BY_SIZE}", show_default=False),
    patience: Optional[int] = typer.Option(None, "--patience", help=f"Stop after N validations without improvement (0: never). [default: {_T.patience}]"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N optimizer steps."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Stop after N passes over the training text."),
    time_limit: Optional[str] = typer.Option(None, "--time-limit", help=f"Stop after this much training time: 600, 90s, 10m, 1h; 0 for none. [default: {_T.time_limit:.0f}s]"),
    ema: Optional[float] = typer.Option(None, "--ema", help=f"Validate and save a moving average of the weights with this decay per step (0 to disable; 0.99 averages ~100 steps). {BY_SIZE}", show_default=False),
    seed: int = typer.Option(_T.seed, "--seed", help="Random seed: the same seed and settings repeat a run."),
    precision: PrecisionOption = Precision.auto,
    device: DeviceOption = Device.auto,
    threads: ThreadsOption = 0,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or previews on stderr."),
) -> None:
    """Train a model on CORPUS and save it in the model home as NAME (prints its directory)."""
    with _errors_to_exit():
        if fine_tune:
            raise UsageError("--fine-tune is gone: to train on new text, start a new model from the trained one with "
                             "--from MODEL --name NEW (its vocabulary grows by the new characters; MODEL stays as it is)")
        budget = {k: v for k, v in {"max_steps": max_steps, "epochs": epochs, "patience": patience,
                                    "time_limit": _seconds(time_limit)}.items() if v is not None}
        budget = {k: (v or None) if k != "patience" else v for k, v in budget.items()}  # 0 = no limit
        settings = dict(
            tokenizer=tokenizer.value, vocab_size=vocab_size, spm_model_type=spm_model_type.value,
            batch_size=batch_size, seq_len=seq_len, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
            lr_schedule=lr_schedule.value, grad_clip=grad_clip, val_fraction=val_fraction, eval_every=eval_every,
            seed=seed, precision=precision.value, ema=ema,
        )
        given = lambda option: ctx.get_parameter_source(option).name != "DEFAULT"  # noqa: E731
        network = None
        if base is None:
            training = TrainConfig(**settings, **budget)
            network = ModelConfig(rnn_type=rnn_type.value, num_layers=layers, hidden_size=hidden_size,
                                  embedding_dim=embedding_dim, dropout=dropout, embedding_dropout=embedding_dropout,
                                  weight_drop=weight_drop, tie_weights=tie_weights)  # None: chosen by the corpus size
        else:  # the base's network; the fine-tuning defaults for every setting not given
            shaped = [flag for option, flag in NETWORK_OPTIONS.items() if given(option)]
            if shaped:
                raise UsageError(f"{shaped[0]} does not go with --from: the new model keeps the network of the model "
                                 "it starts from; leave it out (or train from scratch without --from)")
            training = TrainConfig.fine_tuning(**{k: v for k, v in settings.items() if given(k)}, **budget)
        _set_threads(threads)

        from rnngen.api import model_dir, run_training
        from rnngen.distributed import process_rank
        from rnngen.progress import TrainDisplay

        out_dir = model_dir(corpus, name, out)
        main = process_rank() == 0  # under torchrun, only rank 0 talks
        stop = _StopFlag(announce=main)

        def progress(kind: str, info: dict) -> None:
            if kind == "start":  # from here on a signal stops training after its step
                stop.training = True
            display.update(kind, info)

        try:
            with TrainDisplay(enabled=main and not quiet) as display, stop.installed():
                result = run_training(corpus, out_dir, model=network, training=training, budget=budget, base=base,
                                      resume=resume, force=force, encoding=encoding,
                                      device=device.value, on_progress=progress, should_stop=stop)
        except Interrupted as exc:
            if main:
                _err("Interrupted before training started; nothing was saved.")
            raise typer.Exit(128 + exc.signum) from None
        if not main:
            raise typer.Exit(128 + stop.signum if result.stop_reason == "interrupted" else 0)
        if result.stop_reason == "interrupted":
            again = ["rnngen", "train", *corpus, "--out", str(out_dir), "--resume"]
            again += ["--encoding", encoding] if encoding != "utf-8" else []
            _err(f"Interrupted at step {result.steps}; checkpoint saved. Continue with: {_command_line(again)}")
            raise typer.Exit(128 + stop.signum)
        heldout = result.heldout
        if heldout is not None:  # as 'rnngen evaluate' and 'rnngen models' give them
            bpc = (f", held-out {heldout['bits_per_char']:.3f} bits/char (network alone "
                   f"{heldout['bits_per_char_network']:.3f}, without song memory {heldout['bits_per_char_base']:.3f})")
        elif result.best_val_bpc is not None:
            bpc = f", best validation {result.best_val_bpc:.3f} bits/char (network alone)"
        else:
            bpc = ""
        from rnngen.home import display_name

        try_it = _command_line(["rnngen", "sample", "--model", display_name(out_dir)])
        _err(f"Done: {result.stop_reason} after {result.steps} steps{bpc}. Try: {try_it}")
        _emit(f"{out_dir}\n")  # the model is saved: a closed pipe here still exits 0


def _command_line(args: list[str]) -> str:
    """ARGS quoted so that pasting the line into a shell runs them."""
    if os.name == "nt":
        import subprocess

        return subprocess.list2cmdline(args)
    import shlex

    return shlex.join(args)


class _StopFlag:
    """Before training's first step (reading, tokenising, indexing) Ctrl-C / SIGTERM stop at once,
    cleaning up as the exception unwinds. During training, the first finishes the step and saves;
    a second exits at once. Checkpoint files are replaced atomically, so exiting at any moment
    leaves the last good one.
    """

    def __init__(self, announce: bool = True) -> None:
        self.signum = 0
        self.announce = announce
        self.training = False  # set when the first step is about to run

    def __call__(self) -> bool:
        return self.signum != 0

    def _handle(self, signum, frame) -> None:
        if not self.training:
            self.signum = signum
            raise Interrupted(signum)
        if self.signum:
            os.write(2, b"\nStopped at once; the last checkpoint is intact.\n" if self.announce else b"")
            os._exit(128 + self.signum)
        self.signum = signum
        if self.announce:
            _err("\nStopping after this step and saving a checkpoint (press Ctrl-C again to stop at once)...")

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            if not self.signum:  # once stopping, a second signal must still mean "now", even during exit
                for s, handler in previous.items():
                    signal.signal(s, handler)


# ---- sample -----------------------------------------------------------------------------------


@app.command()
def sample(
    model: ModelOption = None,
    seed: str = typer.Option("", "--seed", "-s", help="Text to continue (printed first). Default: start a new song."),
    length: Optional[int] = typer.Option(None, "--length", "-n", help=f"Characters to generate after the seed. [default: {DEFAULT_LENGTH}; with --lines, --acrostic or --songs: room for all of them ({SONG_ROOM} characters a song). A sample that reaches the length before its songs or lines are done exits with code 3, saying so.]"),
    temperature: float = typer.Option(_S.temperature, "--temperature", "-t", help="Below 1: safer, above 1: wilder; 0: always the likeliest (greedy)."),
    top_k: int = typer.Option(_S.top_k, "--top-k", help="Sample only from the k likeliest tokens (0: no limit)."),
    top_p: float = typer.Option(_S.top_p, "--top-p", help="Sample only from the likeliest tokens whose probabilities add up to p (1: no limit)."),
    num_samples: int = typer.Option(1, "--num-samples", help="Number of samples, generated together in one batch."),
    random_seed: Optional[int] = typer.Option(None, "--random-seed", help="Seed for the sampler: the same seed gives the same text. Default: random."),
    stop_at_end: bool = typer.Option(False, "--stop-at-end", help="End a sample when the model ends the song (it may then be shorter than --length)."),
    lines: Optional[int] = typer.Option(None, "--lines", help="Write exactly N lines (char models)."),
    line_length: Optional[str] = typer.Option(None, "--line-length", help="Characters per line: 7, or a pattern such as 5,7,5 repeated over the lines (char models)."),
    songs: Optional[int] = typer.Option(None, "--songs", help="Write K whole songs, each ended by the model's end-of-song token."),
    acrostic: str = typer.Option("", "--acrostic", help="藏头: line i starts with the i-th of these characters, e.g. 春夏秋冬 (char models)."),
    rhyme: str = typer.Option("", "--rhyme", help="押韵 scheme such as AABB, ABAB or AAAA: lines with the same letter end in characters of one rhyme group of --rhyme-book. Without --line-length the model ends each line where it likes, on a rhyme."),
    rhyme_book: Optional[str] = typer.Option(None, "--rhyme-book", help="Which characters rhyme (and, with --form, their 平仄): xinyun (中华新韵, Mandarin, for songs), pingshui (平水韵) or cilin (词林正韵). [default: with --form the form's book (pingshui for 诗, cilin for 词), else xinyun]"),
    form: str = typer.Option("", "--form", help="Write one poem in a verse form, e.g. 七言绝句 (七绝), 浣溪沙, 沁园春: its clauses one a line, each its length in Han characters with its punctuation, 平仄 and rhymes by --rhyme-book ('rnngen forms' lists them)."),
    candidates: Optional[int] = typer.Option(None, "--candidates", help=f"With --form: write each clause N times and keep the one the model finds likeliest. [default: {DEFAULT_CANDIDATES}]"),
    keywords: str = typer.Option("", "--keywords", help="Words that appear verbatim, e.g. 春风,明月: each where a plan puts it (a line and a place in it, spread over the song; with --form a clause whose 平仄 its characters fit), and the rest of the text leans towards what goes with them in the training text."),
    topic: float = typer.Option(TOPIC_WEIGHT, "--topic", help=f"With --keywords: how strongly the text leans towards the keywords' company in the training text (0: the keywords are placed, nothing else changes; at most {MAX_TOPIC:g})."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="Above 1 makes characters already in the sample less likely (1: off)."),
    max_copy: Optional[int] = typer.Option(None, "--max-copy", help="Never write a run of more than K characters found verbatim in the training text: a token that would make one is struck out and another drawn."),
    no_song_memory: bool = typer.Option(False, "--no-song-memory", help="Do not let a song draw on its own earlier text (by default a chorus can come back, as in real songs, while a passage is not looped and a unit sung twice in a line is seldom sung a third time)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per sample (text, settings, seeds, and how much of it is copied from the training text: longest_copy, copied_8gram_share) instead of plain text."),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Ask for seeds on the terminal, one per line, and answer each with lyrics; the model stays loaded. Each answer draws fresh randomness (with --random-seed S, answer k uses S + k). Ctrl-C stops a sample, Ctrl-D quits."),
    precision: PrecisionOption = Precision.auto,
    device: DeviceOption = Device.auto,
    threads: ThreadsOption = 0,
) -> None:
    """Continue --seed with generated text, streamed to stdout."""
    with _errors_to_exit():
        _set_threads(threads)
        from rnngen.sampling import make_request

        request = make_request(  # checked before the model loads
            seed, length=length, temperature=temperature, top_k=top_k, top_p=top_p, num_samples=num_samples,
            random_seed=random_seed, stop_at_end=stop_at_end, songs=songs, lines=lines, line_length=line_length,
            acrostic=acrostic, rhyme=rhyme, rhyme_book=rhyme_book, repetition_penalty=repetition_penalty,
            max_copy=max_copy, song_memory=not no_song_memory, form=form, candidates=candidates, keywords=keywords,
            topic=topic)
        loaded = _load(model, device, precision)
        if interactive:
            _interactive(loaded, request, as_json)
            return
        _sample_once(loaded, request, as_json)


def _sample_once(model, request, as_json: bool) -> None:
    lacking = model.unknown_chars(request.seed_text)
    if lacking:
        _err(f"Warning: the model has never seen {''.join(sorted(lacking))[:20]!r}; it reads them as unknown")
    _write_samples(model, request, as_json)
    if request.dead_ends:
        _err(f"Warning: {request.dead_ends} time(s) the line structure left only characters that continue a copy "
             f"longer than --max-copy {request.max_copy}; the structure won (see longest_copy in --json)")


def _interactive(model, request, as_json: bool) -> None:
    """A prompt loop: each line typed is a seed (with --form, keywords); the same options answer every one,
    each with fresh randomness."""
    import dataclasses

    try:  # line editing and history where the platform has readline
        import readline  # noqa: F401
    except ImportError:
        pass
    _emit("")  # a closed stdout fails here, in one line, rather than in input()
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is answered with an error, not a crash
        sys.stdin.reconfigure(errors="surrogateescape")
    _err("Type a seed and press Enter (an empty line starts a new song). Ctrl-C stops a sample, Ctrl-D quits.")
    for k in itertools.count():
        sys.stderr.write("seed> ")  # the prompt is not product: stdout stays clean for pipes
        sys.stderr.flush()
        try:
            line = input()
        except (EOFError, KeyboardInterrupt):
            _err("")
            return
        seed = None if request.random_seed is None else (request.random_seed + k) % (MAX_SEED + 1)
        typed = {"seed_text": line.strip()}
        if request.form:  # a poem has no seed: the line typed is its keywords (春风,明月)
            from rnngen.compose import parse_keywords

            typed = {"keywords": parse_keywords(line.strip()) or request.keywords}
        one = dataclasses.replace(request, random_seed=seed, structure=dataclasses.replace(request.structure), **typed)
        try:
            one.validate()  # a new request: the seed typed is checked with the options
            _sample_once(model, one, as_json)
        except RnngenError as exc:  # a bad seed is answered, not fatal
            _err(f"Error: {exc}")
        except KeyboardInterrupt:
            _emit("\n")


def _write_samples(model, request, as_json: bool) -> None:
    pieces = model.samples(request)
    if request.num_samples == 1 and not as_json:
        try:
            for _, text in pieces:  # stream as tokens are made
                _emit(text)
        except Incomplete:  # a sample cut at its length limit ends its line before the error is told
            _emit("\n")
            raise
        _emit("\n")
        return
    texts = [""] * request.num_samples
    cut = None
    try:
        for i, text in pieces:
            texts[i] += text
    except Incomplete as exc:  # what was made is written, then the error
        cut = exc
    _write_texts(model, request, texts, as_json)
    if cut is not None:
        raise cut


def _write_texts(model, request, texts: list[str], as_json: bool) -> None:
    for i, text in enumerate(texts):
        if as_json:
            s = request.settings
            record = {"text": text, "index": i, "seed": request.seed_text, "random_seed": request.random_seed,
                      "length": request.length, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
                      "max_copy": request.max_copy, "model": str(model.directory)}
            if request.form:
                record.update(form=request.verse_form().name, candidates=request.candidates,
                              keywords=list(request.keywords))
            if model.index is not None:  # how much of the sample occurs verbatim in the training text
                record.update(model.copy_report(text).to_dict())
            else:
                record.update(longest_copy=None, longest_copy_text=None, copied_8gram_share=None)
            _emit(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            _emit(("\n" if i else "") + text + "\n")


def _emit(text: str) -> None:
    """The one place that writes the product to stdout, as UTF-8 whatever the locale or console.

    A closed pipe (`| head`) ends the command quietly with exit 0; a closed stdout or a failed write
    (a full disk) is one 'Error: ...' line and exit 1.
    """
    out = sys.stdout
    try:
        if out is None:  # fd 1 was closed when Python started
            raise OSError(errno.EBADF, "it is closed")
        buffer = getattr(out, "buffer", None)
        if buffer is None:  # stdout replaced by a text-only stream (an IDE, a test harness)
            out.write(text)
            out.flush()
        else:  # bytes: a Windows console's buffer takes UTF-8 too
            out.flush()
            buffer.write(text.encode("utf-8", "replace"))
            buffer.flush()
    except BrokenPipeError:
        _quiet_stdout()
        raise typer.Exit(0) from None
    except OSError as exc:
        _quiet_stdout()
        _err(f"Error: cannot write to standard output: {exc.strerror or exc}")
        raise typer.Exit(1) from None


def _emit_table(table) -> None:
    """A rich table through _emit: styled on a terminal (not on Windows, whose console may not read ANSI)."""
    from rich.console import Console

    tty = sys.stdout is not None and sys.stdout.isatty() and os.name != "nt"
    console = Console(file=io.StringIO(), force_terminal=tty, color_system="auto" if tty else None)
    console.print(table)
    _emit(console.file.getvalue())


def _quiet_stdout() -> None:
    """After a closed pipe or a failed write, send what is left nowhere so Python exits quietly."""
    if sys.stdout is not None:  # None: fd 1 was closed at start-up (and may now be another file)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _load(model: Optional[str], device: Device, precision: Precision):
    from rnngen.api import load

    return load(model, device.value, precision.value)


# ---- evaluate ---------------------------------------------------------------------------------


@app.command()
def evaluate(
    files: Optional[List[str]] = typer.Argument(None, metavar="[FILE...]", help="Text to score (files, directories, or - for stdin). Default: the model's own validation split."),
    model: ModelOption = None,
    encoding: EncodingOption = "utf-8",
    samples: Optional[str] = typer.Option(None, "--samples", help="Instead of the loss: how much of this text (a file, or - for stdin) is copied from the model's training text, as the longest verbatim run and the share of 8-character windows found there."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    no_song_memory: bool = typer.Option(False, "--no-song-memory", help="Score without song memory (each song's own earlier text): bits_per_char then equals bits_per_char_base."),
    precision: PrecisionOption = Precision.auto,
    device: DeviceOption = Device.auto,
    threads: ThreadsOption = 0,
) -> None:
    """Report held-out loss (nats/token), perplexity and bits per character: as the model predicts
    (network, n-gram and song memory), without song memory (base), and of the network alone."""
    with _errors_to_exit():
        _set_threads(threads)
        if samples is not None and files:
            raise UsageError("give either FILE (to measure the loss) or --samples (to measure copying), not both")
        loaded = _load(model, device, precision)
        if samples is not None:
            from rnngen.data import read_corpus
            from rnngen.evaluate import describe_sources

            corpus = read_corpus([samples], encoding)
            _copy_table(loaded, describe_sources(corpus.sources), corpus.text, as_json)
            return
        if files:
            metrics = loaded.score_files(files, encoding, song_memory=not no_song_memory)
        else:
            metrics = loaded.score_validation(song_memory=not no_song_memory)
        if as_json:
            _emit(json.dumps({**metrics.to_dict(), "model": str(loaded.directory)}, ensure_ascii=False) + "\n")
            return
        rows = (("tokens", f"{metrics.tokens:,}"), ("characters", f"{metrics.characters:,}"),
                ("loss (nats/token)", f"{metrics.loss:.4f}"), ("perplexity", f"{metrics.perplexity:.2f}"),
                ("bits per character" + (" (with song memory)" if metrics.song_memory else ""),
                 f"{metrics.bits_per_char:.4f}"),
                ("bits per character without song memory", f"{metrics.bits_per_char_base:.4f}"),
                ("bits per character, network alone", f"{metrics.bits_per_char_network:.4f}"),
                ("bits per character, n-gram alone",
                 "-" if metrics.bits_per_char_ngram is None else f"{metrics.bits_per_char_ngram:.4f}"),
                ("unknown characters", f"{metrics.unknown_chars:,}"))
        _emit_table(_table(f"{loaded.name}: {metrics.source}", rows))


def _table(title: str, rows):
    """A two-column metric/value table."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, value in rows:
        table.add_row(label, value)
    return table


def _copy_table(model, source: str, text: str, as_json: bool) -> None:
    report = model.copy_report(text)
    record = {"source": source, "characters": len(text), **report.to_dict(), "model": str(model.directory)}
    if as_json:
        _emit(json.dumps(record, ensure_ascii=False) + "\n")
        return
    _emit_table(_table(f"{model.name}: copying in {source}", (
        ("characters", f"{len(text):,}"),
        ("longest run found in the training text", f"{report.longest_copy:,} characters"),
        ("that run", repr(report.longest_copy_text)),
        ("8-character windows found there", f"{report.copied_8gram_share:.1%}"))))


# ---- the models a user has ---------------------------------------------------------------------


@app.command("models")
def list_models(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array instead of a table."),
) -> None:
    """List every model: those in the model home, then the bundled one."""
    with _errors_to_exit():
        from rnngen.home import home
        from rnngen.store import list_all

        records = list_all()
        if as_json:
            _emit(json.dumps(records, ensure_ascii=False) + "\n")
            return
        from rich.table import Table

        table = Table(title=f"models in {home()} (set RNNGEN_HOME to use another folder)", title_justify="left")
        for column in ("name", "network", "corpus", "bits/char", "network alone", "trained", "size"):
            table.add_column(column, justify="right" if column in ("bits/char", "network alone", "size") else "left")
        starred = False
        for r in records:
            if "error" in r:
                table.add_row(r["name"], "damaged", r["error"], "", "", "", "")
                continue
            star = "*" if r["val_bpc_source"] == "training" else ""
            starred = starred or bool(star)
            bpc = "-" if r["val_bpc"] is None else f"{r['val_bpc']:.3f}{star}"
            net = "-" if r["val_bpc_network"] is None else f"{r['val_bpc_network']:.3f}{star}"
            note = " (bundled)" if r["bundled"] else " (exported)" if r["exported"] else ""
            table.add_row(r["name"] + note, f"{r['network']} {r['tokenizer']}", r["corpus"] or "-", bpc, net,
                          (r["trained"] or "-")[:16].replace("T", " "), _bytes(r["size_bytes"]))
        if starred:
            table.caption = ("bits/char: held-out, as 'rnngen evaluate' gives them; * training's check on at most "
                             "100k validation tokens (models trained before rnngen stored the full figure)")
            table.caption_justify = "left"
        _emit_table(table)


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return ""


@app.command()
def info(
    name: str = typer.Argument(..., metavar="NAME", autocompletion=_model_names, help="A model's name (see 'rnngen models') or directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Show one model in full: network, tokenizer, training settings, corpus, result and files."""
    with _errors_to_exit():
        from rnngen.home import resolve_model
        from rnngen.store import info as model_info

        directory = resolve_model(name)
        record = model_info(directory.name, directory)
        if as_json:
            _emit(json.dumps(record, ensure_ascii=False) + "\n")
            return
        config = record["config"]
        rows = [("path", record["path"]), ("network", f"{record['network']}, vocabulary {record['vocab_size']:,}"),
                ("tokenizer", str(record["tokenizer"])), ("corpus", record["corpus"] or "-"),
                ("trained", record["trained"] or "-"), ("size on disk", _bytes(record["size_bytes"]))]
        rows += [(f"model.{k}", str(v)) for k, v in config.get("model", {}).items()]
        rows += [(f"train.{k}", str(v)) for k, v in config.get("train", {}).items()]
        rows += [(f"result.{k}", str(v)) for k, v in config.get("result", {}).items()]
        rows += [("exported", json.dumps(config["exported"]))] if "exported" in config else []
        rows += [("from", _lineage(config["from"]))] if config.get("from") else []
        rows += [(f"file {k}", _bytes(v)) for k, v in record["files"].items()]
        _emit_table(_table(f"{record['name']}", rows))


def _lineage(lineage: dict) -> str:
    """config.json's `from` in words: 'songci (corpus b86ac3a4..., vocabulary 5,959 + 120 new characters) <- ...'."""
    parts = []
    while lineage:
        sha = lineage.get("corpus_sha256")
        parts.append(f"{lineage['name']} (" + (f"corpus {sha[:8]}..., " if sha else "")
                     + f"vocabulary {lineage.get('vocab_size', 0):,} + {lineage.get('new_chars', 0):,} new characters)")
        lineage = lineage.get("from")
    return " <- ".join(parts)


@app.command()
def rm(
    name: str = typer.Argument(..., metavar="NAME", autocompletion=_model_names, help="The model's name in the model home (see 'rnngen models')."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
) -> None:
    """Remove a model from the model home (only the files rnngen wrote)."""
    with _errors_to_exit():
        from rnngen.home import home
        from rnngen.store import removable, remove

        directory = removable(name)
        link = os.readlink(directory) if directory.is_symlink() else None
        if not yes:
            if not sys.stdin or not sys.stdin.isatty():
                raise UsageError(f"rnngen rm asks before removing; add --yes to remove {name!r} without asking")
            what = f"the link {name!r} (not what it points to)" if link is not None else f"the model {name!r}"
            if not typer.confirm(f"Remove {what} from {home()}?", err=True):
                _err("Nothing removed.")
                raise typer.Exit(1)
        left = remove(name)
        if link is not None:
            _err(f"Removed the link {name}; what it points to ({link}) was left alone.")
            return
        note = f"; kept your files there: {', '.join(left[:5])}" if left else ""
        _err(f"Removed {name}{note}.")


@app.command()
def export(
    name: str = typer.Argument(..., metavar="NAME", autocompletion=_model_names, help="A model's name (see 'rnngen models') or directory."),
    out: Path = typer.Option(..., "--out", "-o", help="A new directory to write the copy into."),
    dtype: str = typer.Option("fp16", "--dtype", help="Weights as fp16 (half the size) or fp32 (bit-identical samples)."),
    with_index: bool = typer.Option(False, "--with-index", help="Include the copy-check index, so --max-copy and --json's copy figures work."),
) -> None:
    """Write a slim, self-contained copy of a model for sharing: weights, tokenizer, n-gram and
    config; no training state or token cache. It samples like the original but cannot be resumed."""
    with _errors_to_exit():
        from rnngen.home import resolve_model
        from rnngen.store import export as export_model

        directory = export_model(resolve_model(name), out, dtype, with_index)
        _err(f"Exported to {directory} ({_bytes(sum(p.stat().st_size for p in directory.iterdir()))}).")
        _emit(f"{directory}\n")


# ---- plot ---------------------------------------------------------------------------------------


@app.command()
def plot(
    names: List[str] = typer.Argument(..., metavar="NAME...", autocompletion=_model_names, help="Models whose training curves to draw (several compare runs)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write a PNG here (needs the extra: pip install 'rnngen[plot]'). Default: a text chart on the terminal."),
) -> None:
    """Draw training loss and validation bits/char from each model's metrics.jsonl."""
    with _errors_to_exit():
        from rnngen.home import resolve_model
        from rnngen.plot import plot_runs

        text = plot_runs([resolve_model(n) for n in names], out)
        if text:
            _emit(text)


# ---- verse forms --------------------------------------------------------------------------------


@app.command("forms")
def list_forms(
    name: Optional[str] = typer.Argument(None, metavar="[NAME]", help="A form or an alias (七绝, 浣溪沙, 百字令); without it, every form."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """List the verse forms (regulated verse and 词牌), or show one form's pattern clause by clause."""
    with _errors_to_exit():
        from rnngen.forms import FORMS, find_form
        from rnngen.rhymebook import load_book

        if name is not None:
            form = find_form(name)
            _emit((json.dumps(form.to_dict(), ensure_ascii=False) if as_json else form.describe()) + "\n")
            return
        if as_json:
            _emit(json.dumps([f.to_dict() for f in FORMS.values()], ensure_ascii=False) + "\n")
            return
        from rich.table import Table

        table = Table(title="verse forms ('rnngen forms NAME' shows one)", title_justify="left")
        for column in ("name", "aliases", "kind", "clauses", "characters", "rhyme book"):
            table.add_column(column, justify="right" if column in ("clauses", "characters") else "left", overflow="fold")
        for f in FORMS.values():
            table.add_row(f.name, "、".join(f.aliases) or "-", f.kind, str(f.clause_count), str(f.characters),
                          load_book(f.default_book).title)
        _emit_table(table)


# ---- serve --------------------------------------------------------------------------------------


@app.command()
def serve(
    model: Optional[List[str]] = typer.Option(None, "--model", "-m", autocompletion=_model_names, help="Model to serve, by name or path (repeat for several). Default: the most recently trained, else the bundled one."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RNNGEN_API_KEY", show_envvar=True, help="Require 'Authorization: Bearer KEY' on every API request (/v1/...; the page and /health stay open). Sent in clear over plain HTTP."),
    allowed_host: Optional[List[str]] = typer.Option(None, "--allowed-host", help="A name clients may reach the server by (the Host header), besides localhost, IP addresses and --host; repeat for several, '*' for any (behind a proxy that checks it). Other names get 421: a web page cannot rebind its own name to this server."),
    forwarded_allow_ips: Optional[str] = typer.Option(None, "--forwarded-allow-ips", help="Proxies whose X-Forwarded-For/-Proto are believed (the access log's client): comma-separated addresses or networks, or '*'. [default: none]"),
    request_timeout: Optional[float] = typer.Option(None, "--request-timeout", help="Seconds a client has to send a request's headers, and again its body; slower connections are closed (a slow body gets 408). [default: 30]"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Most characters one choice may ask for (max_tokens); also the length with lines, songs or an acrostic. [default: 4000]"),
    max_n: Optional[int] = typer.Option(None, "--max-n", help="Most choices in one request (n times the prompts). [default: 16]"),
    max_prompt: Optional[int] = typer.Option(None, "--max-prompt", help="Most characters in a prompt. [default: 4000]"),
    max_body: Optional[int] = typer.Option(None, "--max-body", help="Most bytes in a request body. [default: 1000000]"),
    max_streams: Optional[int] = typer.Option(None, "--max-streams", help="Most streams generating at once per model; more get 429 (busy). [default: 256]"),
    threads: int = typer.Option(1, "--threads", help="CPU threads for torch (1 suits a few shared cores: the HTTP side needs one too; 0: torch's default)."),
) -> None:
    """Serve models over an OpenAI-compatible HTTP API (/v1/completions) with a web page at /."""
    with _errors_to_exit():
        from rnngen.server import run
        from rnngen.serving.protocol import Limits

        given = {"max_tokens": max_tokens, "max_n": max_n, "max_prompt": max_prompt, "max_body": max_body,
                 "max_streams": max_streams, "request_timeout": request_timeout}
        limits = Limits(**{k: v for k, v in given.items() if v is not None})
        if api_key is None and "RNNGEN_API_KEY" in os.environ:  # click reads an empty variable as unset: an open server
            api_key = os.environ["RNNGEN_API_KEY"]
        raise typer.Exit(run(model or [], host=host, port=port, api_key=api_key, limits=limits, threads=threads,
                             allowed_hosts=allowed_host or [], forwarded_allow_ips=forwarded_allow_ips))


def main() -> None:
    app(prog_name="rnngen")  # also under `python -m rnngen`: the same help, hints and completion
