"""Training: truncated BPTT with carried state, AdamW, the learning-rate Schedule (by default warm-up,
then the peak held, then a cosine decay over the last quarter of the budget: "wsd"), early stopping,
resume."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from rnngen.modeldir import (
    LoadedModel, abandon, begin, build_meta, check_out_dir,
    commit, load_model, locked, load_trainer_state, read_config, remove_if_only_ours, save_trainer_state, save_weights, write_config,
)
from rnngen import memory, tokencache
from rnngen.grow import CALIBRATION_TOKENS, Base, grow_model, open_base
from rnngen.config import MAX_SEED, ModelConfig, TrainConfig
from rnngen.data import BatchStream, Corpus, CorpusFiles, Position
from rnngen.device import autocast, pick_device, pick_dtype
from rnngen.distributed import World, join, leave, process_rank
from rnngen.errors import CorpusError, Diverged, ModelError, UsageError
from rnngen.files import append_line, atomic_write
from rnngen.layout import CONFIG_FILE, INDEX_FILE, METRICS_FILE, NGRAM_FILE, STAGING_DIR, TRAINER_FILE, WEIGHTS_FILE
from rnngen.model import RNNLM, sum_nll
from rnngen.ngram import MAX_TOKENS as MAX_NGRAM_TOKENS, ORDER as NGRAM_ORDER, KneserNey
from rnngen.novelty import MAX_INDEX_CHARS, CorpusIndex
from rnngen.sampling import Sampler, make_request
from rnngen.tokenizer import CharTokenizer, load_tokenizer

ProgressFn = Callable[[str, dict[str, Any]], None]


@dataclass
class TrainResult:
    directory: Path
    steps: int
    stop_reason: str
    best_val_loss: float | None
    best_val_bpc: float | None  # the network alone
    val_bpc: float | None = None  # the model's prediction: network, n-gram and song memory
    val_bpc_base: float | None = None  # network and n-gram, without song memory
    heldout: dict[str, Any] | None = None  # what `rnngen evaluate` (and `rnngen models`) give: metadata.HELDOUT_KEYS


class Schedule:
    """The learning rate over a run, all of it here. Every schedule warms up linearly over
    warmup_steps. wsd (the default): the peak `lr` held, then a cosine decay to lr * min_lr_ratio
    over the last decay_fraction of the budget (steps or time); cosine: that decay over the whole
    budget; plateau: the peak halved after every second validation in a row without improvement;
    constant: the peak."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.plateau_scale = 1.0  # plateau: the halvings so far (kept in trainer.pt)

    def rate(self, step: int, progress: float) -> float:
        """The rate for optimizer step `step`, `progress` (0..1) through the budget."""
        cfg = self.cfg
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        factor = 1.0
        if cfg.lr_schedule in ("cosine", "wsd"):
            start = 1.0 - cfg.decay_fraction if cfg.lr_schedule == "wsd" else 0.0
            p = min(1.0, max(0.0, progress - start) / (1.0 - start))
            factor = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
        elif cfg.lr_schedule == "plateau":
            factor = self.plateau_scale
        return cfg.lr * warm * factor

    def validated(self, bad_evals: int) -> None:
        """Told after each validation how many in a row have not improved."""
        if self.cfg.lr_schedule == "plateau" and bad_evals and bad_evals % 2 == 0:
            self.plateau_scale *= 0.5


def _param_groups(model: RNNLM, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embedding")]
    seen = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in seen]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _detach(state):
    if state is None:
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def train(
    corpus: Corpus | CorpusFiles,
    out_dir: Path,
    model_options: dict[str, Any],
    config: TrainConfig,
    *,
    resume: bool = False,
    force: bool = False,
    base: str | os.PathLike | None = None,
    budget_overrides: dict[str, Any] | None = None,
    device: str = "auto",
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> TrainResult:
    """Train (or, with `resume`, continue) the model in `out_dir` and return how the run ended.

    `model_options` are ModelConfig's fields but vocab_size; `budget_overrides` (max_steps, epochs,
    time_limit, patience) also apply to a resumed run. The directory is locked for the run. A fresh
    run is built beside whatever `out_dir` holds and replaces it only at its first complete save
    (modeldir.commit), so a run that fails or is killed before then changes nothing.

    `base` (a model's name, "songci", or a directory; see grow.py) starts the new model from that
    trained one instead of from random weights: its network (model_options are not used), its
    vocabulary grown by the corpus's new characters. The base is only read. With `resume`, `base`
    must be the one the run in `out_dir` started from (a stopped run resumes without it too).
    """
    main = process_rank() == 0  # under torchrun only rank 0 writes
    created = not out_dir.exists()
    start = open_base(base, config) if base is not None else None
    if start is not None and out_dir.resolve() == start.directory.resolve():
        raise UsageError(f"--from {start.spec} is the model this run would write: the model a run starts from is "
                         "never changed; give the new model another --name or --out")
    if main:
        check_out_dir(out_dir, resume, force)  # refuse before creating anything
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    try:
        with locked(out_dir) if main else contextlib.nullcontext():
            if main:
                asked = resume
                resume = check_out_dir(out_dir, resume, force)  # again, now that nobody else can write
                if asked and not resume and on_progress:
                    on_progress("info", {"message": f"the last run in {out_dir} stopped before its first save: "
                                                    "starting from the beginning"})
                if asked and not resume and start is None and os.environ.get("WORLD_SIZE", "1") == "1":
                    start = _staged_base(out_dir, config)  # a --from run that never saved starts from its base again
                begin(out_dir, fresh=not resume)
            try:
                return _train(corpus, out_dir, model_options, config, resume, start, budget_overrides, device,
                              on_progress, should_stop)
            except BaseException:
                if main:
                    abandon(out_dir)
                raise
    finally:
        leave()
        if main and created:
            remove_if_only_ours(out_dir)  # failed before its first save: leave no trace


def _staged_base(out_dir: Path, config: TrainConfig) -> Base | None:
    """The base of a --from run in `out_dir` that was killed before its first save (None: it had none)."""
    try:
        lineage = read_config(out_dir / STAGING_DIR).get("from")
    except ModelError:
        return None
    return open_base(lineage["path"], config) if lineage and lineage.get("path") else None


def _train(corpus, out_dir, model_options, config, resume, base: Base | None, budget_overrides, device, on_progress,
           should_stop) -> TrainResult:
    """train() inside the directory's lock (its arguments, as train() documents them): set up
    (settings, token cache, model, saved state), then run the training loop (_Run.run)."""
    world, dev = join(pick_device(device))
    emit = on_progress if (on_progress and world.main) else (lambda kind, info: None)
    if world.size > 1:  # rank 0 decided in train() (a run that never saved starts afresh): tell the others
        resume = bool(world.sum([float(resume) if world.main else 0.0])[0])
    work = out_dir if resume else out_dir / STAGING_DIR  # where this run writes until its first save is in place
    started = time.perf_counter()

    # 1. the settings: a resumed run's own, with the new budget
    saved, scanned, tokenizer = None, None, None
    if resume:
        meta = read_config(out_dir)
        if base is not None and not base.started(meta):
            how = f"started from {meta['from'].get('name')}" if meta.get("from") else "trained from scratch"
            raise UsageError(f"{out_dir} was {how}, not from {base.spec}: resume it with --resume alone, or start "
                             f"a new model from {base.spec} with --from and another --name or --out")
        if world.main:  # the hash alone first: with an unchanged corpus the token cache is likely still good
            scanned = tokencache.scan(corpus, emit, full=False)
        sha = world.share_digest(scanned.sha256 if scanned else "")
        if meta.get("corpus", {}).get("sha256") != sha:
            raise CorpusError(
                f"this corpus differs from the one {out_dir} was trained on (SHA-256 mismatch); resume with the "
                f"same text, or start a new model from this one on the new text: --from {out_dir} --name NEW"
            )
        config = replace(TrainConfig.from_dict(meta["train"]), **(budget_overrides or {}))
        model_config = ModelConfig.from_dict(meta["model"])
        model_config.validate()
        tokenizer = load_tokenizer(meta["tokenizer"], out_dir)
        saved = load_trainer_state(out_dir)
    else:
        config = replace(config, **(budget_overrides or {}))
    config.validate()
    dtype = pick_dtype(config.precision, dev)
    _check_budget(config)

    # 2. the token cache: rank 0 tokenises the corpus into the model directory once; the other ranks wait
    if world.main:
        if base is not None and not resume:  # the base's vocabulary, and after it the new text's characters it lacks
            scanned = tokencache.scan(corpus, emit)
            tokenizer = base.tokenizer.extended(tokencache.training_chars(corpus, scanned, config, emit))
        reuse = resume and tokencache.cached(out_dir, scanned.sha256, config, tokenizer)
        if not reuse:
            tokenizer, scanned = tokencache.build(corpus, out_dir, config, tokenizer, emit, scanned)
        if not resume:
            tokenizer.save(work)
        emit("tokenized", {"bytes": scanned.bytes, "seconds": time.perf_counter() - started, "cached": reuse})
    sha = world.share_digest(scanned.sha256 if scanned else "")
    if tokenizer is None:  # every rank uses the very tokenizer rank 0 saved
        tokenizer = load_tokenizer(config.tokenizer, work)
    data = tokencache.load(out_dir, sha)
    corpus_info = {"sha256": sha, "bytes": scanned.bytes if scanned else 0, "sources": corpus.sources,
                   "encoding": corpus.encoding}

    # 3. the model: a new one is written with its config, copy-check index and n-gram
    if not resume:
        torch.manual_seed(config.seed)
        asked, config = config, config.sized(len(data.train))  # what was not given, chosen by the corpus size
        if base is not None:
            model, model_config, lineage = _from_base(base, tokenizer, data, emit)
            emit("info", {"message": _size_choice(len(data.train), None, None, asked, config)})
        else:
            try:
                wanted = ModelConfig(vocab_size=tokenizer.vocab_size, **model_options)
                wanted.validate()
                model_config = wanted.sized(len(data.train))
                model_config.validate()
                model = RNNLM(model_config)
            except ValueError as exc:
                raise UsageError(f"{exc}; set --embedding-dim to --hidden-size or drop --tie-weights") from None
            model.init_output_bias(torch.from_numpy(data.counts))
            emit("info", {"message": _size_choice(len(data.train), wanted, model_config, asked, config)})
        if world.main:
            meta = build_meta(model_config, config, tokenizer, corpus_info)
            if base is not None:
                meta["from"] = lineage
            write_config(work, meta)
            # a model from a base can copy the base's text too: the copy check knows both
            _write_index(work, corpus, scanned.bytes, emit, before=CorpusIndex.load(base.directory) if base else None)
            _write_ngram(work, data.train, tokenizer, emit)
    else:
        model = RNNLM(model_config)

    # 4. the run: optimizer and data position, restored from trainer.pt when resuming
    run = _Run(world, dev, dtype, out_dir, work, config, model, tokenizer, data, emit, should_stop)
    if saved is not None:
        run.restore(saved)
        if world.main:  # a kill after the last save may have logged later validations: they will come again
            _truncate_metrics(out_dir / METRICS_FILE, run.step)
    if resume and world.main and not (out_dir / NGRAM_FILE).exists():
        _write_ngram(out_dir, data.train, tokenizer, emit)  # a model from before n-grams: it gets one now
    return run.run()


SHOWN = {"num_layers": "layers", "hidden_size": "hidden size", "embedding_dim": "embedding", "tie_weights": "tied",
         "dropout": "dropout", "embedding_dropout": "embedding dropout", "weight_drop": "weight drop", "ema": "EMA",
         "batch_size": "batch", "eval_every": "validation every"}


def _size_choice(tokens: int, wanted: ModelConfig | None, model: ModelConfig | None, asked: TrainConfig,
                 config: TrainConfig) -> str:
    """The training log's line on what the corpus size chose: 'small corpus (412,345 training tokens): layers 2,
    hidden size 384, ... (given: dropout 0.2)'."""
    chosen, given = [], []
    pairs = [(wanted, model)] if model is not None else []
    for before, after in pairs + [(asked, config)]:
        for name, label in SHOWN.items():
            if hasattr(after, name):
                value = getattr(after, name)
                (given if getattr(before, name) is not None else chosen).append(f"{label} {value:g}" if isinstance(value, float)
                                                                                else f"{label} {str(value).lower()}")
    return (f"{config.size_class} corpus ({tokens:,} training tokens): " + (", ".join(chosen) or "nothing chosen")
            + (f" (given: {', '.join(given)})" if given else "") + "; see rnngen train --help to set any of them")


def _from_base(base: Base, tokenizer: CharTokenizer, data: tokencache.TokenData,
               emit: ProgressFn) -> tuple[RNNLM, ModelConfig, dict[str, Any]]:
    """The base's network with the grown vocabulary (grow.grow_model), its config, and the lineage for config.json."""
    added = tokenizer.vocab_size - base.tokenizer.vocab_size
    sample = torch.from_numpy(np.asarray(data.train[:CALIBRATION_TOKENS]).astype(np.int64))
    model = grow_model(base.loaded.model, tokenizer.vocab_size, data.counts, sample)
    unknown = int(data.counts[tokenizer.unk_id])
    emit("info", {"message": f"starting from {base.spec} ({base.directory}): its {base.tokenizer.vocab_size - 2:,} "
                             f"characters keep their ids; {added:,} new ones from this corpus get new rows"
                             + (f"; {unknown:,} training tokens are still unknown" if unknown else "")})
    return model, model.config, base.lineage(added)


class _Run:
    """One training run: the model, its optimizer, the data position and the bookkeeping of the
    best validation so far. run() is the loop; train_step(), validate(), checkpoint() and finish() its parts."""

    def __init__(self, world: World, dev: torch.device, dtype: torch.dtype, out_dir: Path, work: Path,
                 config: TrainConfig, model: RNNLM, tokenizer, data: tokencache.TokenData, emit: ProgressFn,
                 should_stop: Callable[[], bool]) -> None:
        self.world, self.dev, self.out_dir, self.work, self.config = world, dev, out_dir, work, config
        self.model, self.tokenizer, self.emit, self.should_stop = model, tokenizer, emit, should_stop
        self.val_ids = torch.cat([torch.tensor([tokenizer.eos_id]),
                                  torch.from_numpy(data.val[: config.val_tokens].astype(np.int64))])
        self.val_chars = data.val_chars
        self.val_all = data.val  # the whole validation split (scored once more at the end, as evaluate does)
        self.val_chars_per_token = data.val_chars / max(1, len(data.val))  # bits/char from nats/token
        self.train_chars_per_token = data.train_chars / max(1, len(data.train))
        self.train_tokens = len(data.train)
        self.train_ids = data.train
        self.batches = BatchStream(data.train, config.batch_size, config.seq_len, config.seed,
                                   shard=(world.rank, world.size))
        self.fresh = True
        model.to(dev)
        self.opt = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
        # each rank reads its share of the streams; DDP averages the gradients, so the step equals a
        # single process's step on the whole global batch
        self.forward = model if world.size == 1 else DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.amp = autocast(dev, dtype)
        self.dtype = dtype
        self.scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)  # fp16 needs loss scaling
        self.total_steps = _total_steps(config, self.batches.windows_per_epoch)
        self.step, self.elapsed, self.best, self.bad_evals = 0, 0.0, math.inf, 0
        self.schedule = Schedule(config)
        self.average = _Average(model, config.ema) if config.ema else None  # validated and saved in the weights' place
        self.hidden = None
        self.saved_step: int | None = None  # the step of the last checkpoint
        self.losses: list[float] = []

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from trainer.pt exactly."""
        model = self.model
        _check_saved_shapes(self.out_dir, saved, model)
        try:
            model.load_state_dict(saved["model"])
            self.opt.load_state_dict(saved["optimizer"])
            self.batches.pos = Position(**saved["position"])
            self.step, self.elapsed, self.best = saved["step"], saved["elapsed"], saved["best"]
            self.bad_evals, self.schedule.plateau_scale = saved["bad_evals"], saved["plateau_scale"]
            hidden = tuple(self.batches.my_rows(t).to(self.dev) for t in saved["hidden"]) if saved["hidden"] else None
            if model.config.rnn_type != "lstm" and hidden is not None:
                hidden = hidden[0]
            self.hidden = hidden
            torch.set_rng_state(saved["rng"])
            if saved.get("scaler"):
                self.scaler.load_state_dict(saved["scaler"])
            if self.average is not None:
                self.average.load(saved.get("ema"))
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise ModelError(f"cannot resume from {self.out_dir / TRAINER_FILE}: it does not match this model "
                             f"({str(exc).splitlines()[0][:200]})") from None
        self.saved_step = self.step
        self.fresh = False

    def run(self) -> TrainResult:
        """Step until a budget ends the run, validating and saving every eval_every steps."""
        self.emit("start", {
            "directory": str(self.out_dir), "device": str(self.dev), "precision": str(self.dtype).removeprefix("torch."),
            "params": sum(p.numel() for p in self.model.parameters()), "train_tokens": self.train_tokens,
            "val_chars": self.val_chars, "vocab_size": self.tokenizer.vocab_size,
            "batch_size": self.batches.batch_size, "processes": self.world.size, "seq_len": self.batches.seq_len,
            "total_steps": self.total_steps, "time_limit": self.config.time_limit, "step": self.step,
        })
        self.model.train()
        speed = _Speed()
        last_eval_step = -1 if self.fresh else self.step
        while True:
            if self.world.size > 1:  # every rank stops on the same step: rank 0's clock decides
                self.elapsed = self.world.sum([self.elapsed if self.world.main else 0.0])[0]
            stop_reason = _budget_reason(self.config, self.step, self.elapsed, self.total_steps, self.bad_evals)
            if stop_reason:
                break
            stop_now, seconds, tokens_read = self.train_step()
            speed.add(tokens_read * self.train_chars_per_token * self.world.size, seconds)  # the whole job's speed
            self.emit("step", {"step": self.step, "total_steps": self.total_steps, "train_loss": self.losses[-1],
                               "chars_per_sec": speed.rate, "elapsed": self.elapsed, "progress": self.progress()})
            if stop_now:
                stop_reason = "interrupted"
                break
            if self.step % self.config.eval_every == 0:
                self.emit("eval", self.validate(speed.rate))
                last_eval_step = self.step
                self.checkpoint()
                speed = _Speed()
        if stop_reason != "interrupted" and last_eval_step != self.step and self.losses:
            self.emit("eval", self.validate(0.0))
        self.checkpoint()
        self.world.barrier()
        return self.finish(stop_reason)

    def train_step(self) -> tuple[bool, float, int]:
        """One optimizer step on the next batch: (whether to stop now, seconds, tokens read)."""
        t0 = time.perf_counter()
        config, model = self.config, self.model
        for group in self.opt.param_groups:
            group["lr"] = self.schedule.rate(self.step, self.progress())
        x, y, fresh = self.batches.next()
        if fresh:
            self.hidden = None  # a new epoch starts the streams afresh
        if self.dev.type == "cuda":  # page-locked, so the copy runs alongside the GPU's work
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(self.dev, non_blocking=True), y.to(self.dev, non_blocking=True)
        with self.amp:
            _, hidden, loss = self.forward(x, self.hidden, y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)  # clip the true gradients
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
        loss_value = loss.item()
        if not self.scaler.is_enabled() and not math.isfinite(norm):
            loss_value = norm  # a non-finite gradient would make every weight nan: stop before the update
        flags = [float(self.should_stop()), loss_value]
        stop_now, loss_value = self.world.sum(flags) if self.world.size > 1 else flags  # every rank decides alike
        if not math.isfinite(loss_value):
            raise self.diverged(f"the loss or its gradient became {loss_value}")
        self.scaler.step(self.opt)  # skipped when fp16 gradients overflowed; the scale then shrinks
        self.scaler.update()
        if self.average is not None:
            self.average.update(self.step)
        self.hidden = _detach(hidden)
        self.step += 1
        self.losses.append(loss_value / self.world.size)
        seconds = time.perf_counter() - t0
        self.elapsed += seconds
        return bool(stop_now), seconds, x.numel()

    def validate(self, chars_per_sec: float) -> dict[str, Any]:
        """Score the held-out tokens (with the weight average, when kept); keep the weights when they are
        the best so far; log a metrics line."""
        with self.averaged():
            return self._validate(chars_per_sec)

    def _validate(self, chars_per_sec: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        world, model = self.world, self.model
        train_loss = sum(self.losses[-20:]) / len(self.losses[-20:])
        record: dict[str, Any] = {"step": self.step, "epoch": round(self.step / self.batches.windows_per_epoch, 3),
                                  "elapsed": round(self.elapsed, 1), "train_loss": round(train_loss, 4),
                                  "lr": self.opt.param_groups[0]["lr"], "chars_per_sec": round(chars_per_sec)}
        if self.val_chars:
            nats, n = world.sum(list(sum_nll(model, _share(self.val_ids, world), amp=self.amp)))
            val_loss = nats / n
            record.update(val_loss=round(val_loss, 4),
                          val_bpc=round(val_loss / self.val_chars_per_token / math.log(2), 4))
        else:  # no held-out text: the latest weights are the best we know
            val_loss = -self.step
        if not math.isfinite(val_loss):
            raise self.diverged(f"the validation loss became {val_loss}")
        if val_loss < self.best - 1e-4:  # a real improvement, not float noise
            self.best, self.bad_evals = val_loss, 0
            if world.main:
                save_weights(self.work, model)
            record["saved"] = True
        else:
            self.bad_evals += 1
        self.schedule.validated(self.bad_evals)
        if world.main:
            append_line(self.work / METRICS_FILE, json.dumps(record, allow_nan=False))
            record["preview"] = _preview(model, self.tokenizer, self.config.seed + self.step)
            model.train()
        self.elapsed += time.perf_counter() - t0
        return record

    def checkpoint(self) -> None:
        """Save everything --resume needs; a fresh run's first save moves its files into place."""
        hidden = self.hidden
        parts = () if hidden is None else hidden if isinstance(hidden, tuple) else (hidden,)
        gathered = [self.world.gather_rows(t) for t in parts]
        if not self.world.main:
            return
        model = self.model
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise self.diverged("the weights became nan or inf")
        if not (self.work / WEIGHTS_FILE).exists():  # no validation yet: the latest weights are the best we know
            with self.averaged():
                save_weights(self.work, model)
        save_trainer_state(self.work, {
            "model": model.state_dict(), "optimizer": self.opt.state_dict(),
            "position": {"epoch": self.batches.pos.epoch, "window": self.batches.pos.window},
            "step": self.step, "elapsed": self.elapsed, "best": self.best, "bad_evals": self.bad_evals,
            "plateau_scale": self.schedule.plateau_scale, "rng": torch.get_rng_state(), "scaler": self.scaler.state_dict(),
            "hidden": gathered,  # (layers, global batch, hidden): the same layout for any number of processes
            "ema": self.average.shadow if self.average is not None else None,
        })
        if self.work != self.out_dir:  # the first complete save of a fresh run: it replaces what out_dir held
            commit(self.out_dir)
            self.work = self.out_dir
        self.saved_step = self.step

    def finish(self, stop_reason: str) -> TrainResult:
        """Record the result in config.json and fit the song-memory weights with the best weights."""
        out_dir, step = self.out_dir, self.step
        if not self.world.main:
            return TrainResult(out_dir, step, stop_reason, None, None)
        best_loss = self.best if self.val_chars and self.best < math.inf else None
        best_bpc = None if best_loss is None else best_loss / self.val_chars_per_token / math.log(2)
        meta = read_config(out_dir)
        meta["result"] = {"steps": step, "stop_reason": stop_reason, "best_val_loss": best_loss,
                          "best_val_bpc": best_bpc, "train_seconds": round(self.elapsed, 1),
                          "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if stop_reason != "interrupted" and best_loss is not None:
            self.emit("info", {"message": "fitting song memory on the validation songs"})
            # the weights are fitted, and the held-out figures measured, with the n-gram of the training
            # songs alone (a resumed run finds the validation songs in it too, from its last end)
            loaded = load_model(out_dir, self.dev).for_validation()  # the best weights: read once for both
            shift = _calibrate_unknown(loaded.model, self.val_ids, loaded.tokenizer, self.amp)
            if shift:
                save_weights(out_dir, loaded.model)
                meta["result"]["unknown_shift"] = round(shift, 3)
            mix, figures = _fit_song_memory(loaded, self.val_ids, self.val_chars_per_token, self.amp)
            meta.pop("song_memory", None)  # the key's old name
            meta["mixture"] = mix.to_dict()
            meta["result"].update(figures)
            meta["result"]["heldout"] = _heldout(loaded, mix, self.val_all, self.val_chars)
            if len(self.val_all) and loaded.ngram is not None:
                # then the n-gram learns the validation songs too: a few hundred songs' n-gram is ~0.1
                # bits/char better on new songs with a tenth more of them (and no longer depends on
                # which tenth was drawn for validation); the figures above stay those measured before
                _write_ngram(out_dir, self.train_ids, self.tokenizer, self.emit, validation=self.val_all)
                meta["result"]["ngram_songs"] = "training and validation"
                meta["mixture"] = mix.padded(NGRAM_ORDER).to_dict()
        write_config(out_dir, meta)
        result = TrainResult(out_dir, step, stop_reason, best_loss, best_bpc, meta["result"].get("val_bpc"),
                             meta["result"].get("val_bpc_base"), meta["result"].get("heldout"))
        self.emit("done", {"steps": step, "stop_reason": stop_reason, "best_val_bpc": best_bpc,
                           "val_bpc": result.val_bpc})
        return result

    def averaged(self) -> contextlib.AbstractContextManager:
        """The weights to validate and save: the moving average in the model for the block, when kept."""
        return self.average.swapped() if self.average is not None else contextlib.nullcontext()

    def progress(self) -> float:
        """The share of the step or time budget done (for the schedule and the progress bar)."""
        if self.total_steps:
            return self.step / self.total_steps
        return self.elapsed / self.config.time_limit if self.config.time_limit else 0.0

    def diverged(self, what: str) -> Diverged:
        kept = f"the checkpoint of step {self.saved_step} is kept" if self.saved_step is not None else "nothing was saved"
        return Diverged(f"training diverged after step {self.step}: {what}; {kept}. Lower --lr "
                        f"(now {self.config.lr:g}) or --grad-clip and train again")


class _Average:
    """An exponential moving average of the model's weights. Its decay ramps up from 0 as
    (1 + step) / (10 + step) to `decay`, so the first steps' random weights are soon forgotten."""

    def __init__(self, model: RNNLM, decay: float) -> None:
        self.decay, self.params = decay, list(model.parameters())  # a tied matrix once
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def load(self, saved: list[torch.Tensor] | None) -> None:
        if saved is None:  # a run saved without one: the average starts from the weights as they are
            saved = self.params
        if len(saved) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(saved, self.shadow)):
            raise ValueError("the saved weight average does not match the model")
        for mine, theirs in zip(self.shadow, saved):
            mine.copy_(theirs)

    @contextlib.contextmanager
    def swapped(self):
        """The average in the model's parameters for the block, the trained weights back after it."""
        with torch.no_grad():
            kept = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.shadow):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept):
                    p.copy_(k)


class _Speed:
    """Characters per second since the last validation."""

    def __init__(self) -> None:
        self.chars, self.seconds = 0.0, 0.0

    def add(self, chars: float, seconds: float) -> None:
        self.chars += chars
        self.seconds += seconds

    @property
    def rate(self) -> float:
        return self.chars / self.seconds if self.seconds else 0.0


def _write_index(out_dir: Path, corpus: Corpus | CorpusFiles, size: int, emit: ProgressFn,
                 before: CorpusIndex | None = None) -> None:
    """Keep the training text's copy-check index in the model directory (for sample --max-copy);
    `before` is the index of the text a fine-tuned model learnt first."""
    text = ""
    if size <= 4 * MAX_INDEX_CHARS:  # a character is at most 4 bytes: only then can it be small enough
        text = (before.text + "\n\n" if before else "") + (corpus if isinstance(corpus, Corpus) else corpus.read()).text
    if not text or len(text) > MAX_INDEX_CHARS:
        (out_dir / INDEX_FILE).unlink(missing_ok=True)
        emit("info", {"message": f"the corpus has over {MAX_INDEX_CHARS:,} characters: no copy-check index, "
                                 "so sample --max-copy will not work with this model"})
        return
    emit("info", {"message": "indexing the corpus for copy checks"})
    CorpusIndex.build(text).save(out_dir)


def _check_saved_shapes(out_dir: Path, saved: dict[str, Any], model: RNNLM) -> None:
    """trainer.pt must hold this model's tensors: name the first that differs, in one line."""
    weights, expected = saved.get("model"), model.state_dict()
    if not isinstance(weights, dict):
        raise ModelError(f"cannot resume from {out_dir / TRAINER_FILE}: it holds no model weights")
    for name, want in expected.items():
        have = weights.get(name)
        if not isinstance(have, torch.Tensor):
            raise ModelError(f"cannot resume from {out_dir / TRAINER_FILE}: it lacks {name}; it is not this model's")
        if have.shape != want.shape:
            raise ModelError(f"cannot resume from {out_dir / TRAINER_FILE}: {name} has shape {tuple(have.shape)}, "
                             f"but {out_dir / CONFIG_FILE} makes it {tuple(want.shape)}; the files come from different runs")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the log lines of validations after `step` (a resumed run repeats them)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line torn by a kill
    if len(kept) != len(lines):
        atomic_write(path, "".join(line + "\n" for line in kept).encode("utf-8"))


def _write_ngram(directory: Path, train_ids: np.ndarray, tokenizer, emit: ProgressFn,
                 validation: np.ndarray | None = None) -> None:
    """Keep the training ids (and after them the validation ids, when given) for the n-gram the network
    is mixed with (none for very large corpora)."""
    (directory / NGRAM_FILE).unlink(missing_ok=True)
    if len(train_ids) > MAX_NGRAM_TOKENS:
        emit("info", {"message": f"over {MAX_NGRAM_TOKENS:,} training tokens: no n-gram is mixed in"})
        return
    ids = np.concatenate([[tokenizer.eos_id], np.asarray(train_ids, dtype=np.int64)])  # every song starts after an end
    training = len(ids)
    if validation is not None:
        ids = np.concatenate([ids, np.asarray(validation, dtype=np.int64)])
    KneserNey.save_ids(directory, ids, tokenizer.vocab_size, training=training)


@torch.no_grad()
def _calibrate_unknown(model: RNNLM, val_ids: torch.Tensor, tokenizer, amp, window: int = 512) -> float:
    """Give the unknown token the probability the validation songs show, and return the shift of its
    output bias (nats; 0: left as it was). Training text holds no unknown token, so training drives its
    probability towards 0 and every character the training text lacks costs ~20-25 bits; a few per
    cent of a small Chinese corpus's held-out characters are such. The shift is the maximum-likelihood
    one: the predicted unknown tokens then add up to the number seen. Sampling never draws the token."""
    unk = tokenizer.unk_id
    targets = val_ids[1:]
    seen = int((targets == unk).sum())
    if not seen or unk == tokenizer.eos_id:
        return 0.0
    was_training, device = model.training, model.head.bias.device
    model.eval()
    probs, state = [], None
    for start in range(0, targets.numel(), window):  # one stream, the state carried: p(unknown) at every position
        x = val_ids[start : start + min(window, targets.numel() - start)].unsqueeze(0).to(device)
        with amp:
            logits, state, _ = model(x, state)
        probs.append(logits[0].float().log_softmax(-1)[:, unk].exp().double().cpu())
    model.train(was_training)
    p = torch.cat(probs).clamp(1e-300, 1 - 1e-12).numpy()
    expected = lambda shift: float((p * math.exp(shift) / (1 - p + p * math.exp(shift))).sum())  # noqa: E731
    low, high = -20.0, 40.0
    if expected(high) < seen:
        return 0.0
    for _ in range(60):  # expected() rises with the shift: bisect for expected == seen
        mid = (low + high) / 2
        low, high = (mid, high) if expected(mid) < seen else (low, mid)
    shift = (low + high) / 2
    model.head.bias[unk] += shift
    return shift


HELDOUT_TOKENS = 2_000_000  # the final held-out figure reads at most this many validation tokens


def _fit_song_memory(loaded: LoadedModel, val_ids: torch.Tensor, chars_per_token: float, amp):
    """Fit the mixture weights on the validation ids with the saved (best) model; returns them and bits/char figures."""
    ngram = loaded.ngram
    scored = memory.parts(loaded.model, ngram, val_ids, loaded.tokenizer.eos_id, amp)
    mix = memory.fit(scored, ngram.order if ngram else 1)
    chars = (val_ids.numel() - 1) * chars_per_token
    figures = {"val_bpc": scored.bits(mix, True, chars), "val_bpc_base": scored.bits(mix, False, chars),
               "val_bpc_network": scored.bits(None, False, chars)}
    return mix, {k: round(v, 4) for k, v in figures.items()}


def _heldout(loaded: LoadedModel, mix: memory.Mixture, val: np.ndarray, val_chars: int) -> dict:
    """What `rnngen evaluate` gives for the saved model on its validation split (fp32, all of it up to
    HELDOUT_TOKENS), for `rnngen models` to show."""
    eos_id = loaded.tokenizer.eos_id
    shown = val[:HELDOUT_TOKENS]
    chars = val_chars if len(shown) == len(val) else round(val_chars * len(shown) / max(1, len(val)))
    ids = torch.cat([torch.tensor([eos_id]), torch.from_numpy(np.asarray(shown).astype(np.int64))])
    scored = memory.parts(loaded.model, loaded.ngram, ids, eos_id)
    return {"bits_per_char": round(scored.bits(mix, True, chars), 4),
            "bits_per_char_base": round(scored.bits(mix, False, chars), 4),
            "bits_per_char_network": round(scored.bits(None, False, chars), 4),
            "tokens": len(shown), "characters": chars}


def _check_budget(cfg: TrainConfig) -> None:
    if not (cfg.max_steps or cfg.epochs or cfg.time_limit or cfg.patience):
        raise UsageError("training would never stop: give --max-steps, --epochs, --time-limit or --patience")


def _total_steps(cfg: TrainConfig, windows_per_epoch: int) -> int | None:
    budgets = [cfg.max_steps] if cfg.max_steps else []
    if cfg.epochs:
        budgets.append(max(1, round(cfg.epochs * windows_per_epoch)))
    return min(budgets) if budgets else None


def _budget_reason(cfg: TrainConfig, step: int, elapsed: float, total_steps: int | None, bad_evals: int) -> str:
    if total_steps is not None and step >= total_steps:
        return "step budget reached"
    if cfg.time_limit and elapsed >= cfg.time_limit:
        return "time limit reached"
    if cfg.patience and bad_evals >= cfg.patience:
        return f"early stop: no validation improvement in {cfg.patience} evaluations"
    return ""


def _share(ids: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's contiguous part of a token stream (neighbouring parts share one token, so
    every prediction is counted exactly once across ranks)."""
    if world.size == 1:
        return ids
    per = -(-(ids.numel() - 1) // world.size)
    return ids[world.rank * per : (world.rank + 1) * per + 1]


def _preview(model: RNNLM, tokenizer, seed: int, length: int = 60) -> str:
    """A new song's first `length` characters from the network alone, for the training log."""
    sampler = Sampler(LoadedModel(model, tokenizer, Path()))
    request = make_request(length=length, stop_at_end=True, random_seed=seed % (MAX_SEED + 1))
    return "".join(text for _, text in sampler.generate(request))
