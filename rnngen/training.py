"""Training: truncated BPTT with carried state, AdamW, warm-up + cosine/plateau LR, early stopping, resume."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from rnngen.checkpoint import (
    abandon, begin, build_meta, check_out_dir,
    commit, load_model, locked, load_trainer_state, read_config, remove_if_only_ours, save_trainer_state, save_weights, write_config,
)
from rnngen import memory, tokens
from rnngen.config import ModelConfig, TrainConfig
from rnngen.data import BatchStream, Corpus, CorpusFiles, Position
from rnngen.device import autocast, pick_device, pick_dtype
from rnngen.distributed import World, join, leave, process_rank
from rnngen.errors import CorpusError, Diverged, ModelError, UsageError
from rnngen.files import append_line, atomic_write
from rnngen.layout import INDEX_FILE, METRICS_FILE, NGRAM_FILE, STAGING_DIR, TRAINER_FILE, WEIGHTS_FILE
from rnngen.model import RNNLM, sum_nll
from rnngen.ngram import MAX_TOKENS as MAX_NGRAM_TOKENS, KneserNey
from rnngen.novelty import MAX_INDEX_CHARS, CorpusIndex
from rnngen.sampler import SamplingSettings, generate_ids
from rnngen.tokenizer import load_tokenizer

ProgressFn = Callable[[str, dict[str, Any]], None]
BUDGET_KEYS = ("max_steps", "epochs", "time_limit", "patience")


@dataclass
class TrainResult:
    directory: Path
    steps: int
    stop_reason: str
    best_val_loss: float | None
    best_val_bpc: float | None  # the network alone
    val_bpc: float | None = None  # the model's prediction: network, n-gram and song memory
    val_bpc_base: float | None = None  # network and n-gram, without song memory


def lr_factor(cfg: TrainConfig, step: int, progress: float, plateau_scale: float) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.lr_schedule in ("cosine", "wsd"):
        # wsd: hold the peak, then the same cosine decay compressed into the last part of the budget
        start = 1.0 - cfg.decay_fraction if cfg.lr_schedule == "wsd" else 0.0
        p = min(1.0, max(0.0, progress - start) / (1.0 - start))
        return warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))
    if cfg.lr_schedule == "plateau":
        return warm * plateau_scale
    return warm


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
    fine_tune: bool = False,
    budget_overrides: dict[str, Any] | None = None,
    device: str = "auto",
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> TrainResult:
    """Train (or, with `resume`, continue) the model in `out_dir` and return how the run ended.

    `model_options` are ModelConfig's fields but vocab_size; `budget_overrides` (max_steps, epochs,
    time_limit, patience) also apply to a resumed run. The directory is locked for the run. A fresh
    run is built beside whatever `out_dir` holds and replaces it only at its first complete save
    (checkpoint.commit), so a run that fails or is killed before then changes nothing.
    """
    main = process_rank() == 0  # under torchrun only rank 0 writes
    created = not out_dir.exists()
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
                begin(out_dir, fresh=not resume)
            try:
                return _train(corpus, out_dir, model_options, config, resume=resume, fine_tune=fine_tune,
                              budget_overrides=budget_overrides, device=device, on_progress=on_progress,
                              should_stop=should_stop)
            except BaseException:
                if main:
                    abandon(out_dir)
                raise
    finally:
        leave()
        if main and created:
            remove_if_only_ours(out_dir)  # failed before its first save: leave no trace


def _train(
    corpus: Corpus | CorpusFiles,
    out_dir: Path,
    model_options: dict[str, Any],
    config: TrainConfig,
    *,
    resume: bool = False,
    fine_tune: bool = False,
    budget_overrides: dict[str, Any] | None = None,
    device: str = "auto",
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> TrainResult:
    world, dev = join(pick_device(device))
    emit = on_progress if (on_progress and world.main) else (lambda kind, info: None)
    if world.size > 1:  # rank 0 decided in train() (a run that never saved starts afresh): tell the others
        resume = bool(world.sum([float(resume) if world.main else 0.0])[0])
    work = out_dir if resume else out_dir / STAGING_DIR  # where this run writes until its first save is in place

    saved: dict[str, Any] | None = None
    scanned: tokens.Scan | None = None
    new_corpus = False
    tokenizer = None
    started = time.perf_counter()
    if resume:
        meta = read_config(out_dir)
        if world.main:  # the hash alone first: with an unchanged corpus the token cache is likely still good
            scanned = tokens.scan(corpus, emit, full=False)
        sha = world.share_digest(scanned.sha256 if scanned else "")
        new_corpus = meta.get("corpus", {}).get("sha256") != sha
        if new_corpus and not fine_tune:
            raise CorpusError(
                f"this corpus differs from the one {out_dir} was trained on (SHA-256 mismatch); "
                "resume with the same text, add --fine-tune to continue on new text on purpose, "
                "or train a new model with --name"
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

    # rank 0 tokenises the corpus into the model directory once; the other ranks wait, then map the same files
    if world.main:
        reuse = scanned is not None and tokens.cached(out_dir, scanned.sha256, config, tokenizer)
        if not reuse:
            tokenizer, scanned = tokens.build(corpus, out_dir, config, tokenizer, emit, scanned)
        if not resume:
            tokenizer.save(work)
        emit("tokenized", {"bytes": scanned.bytes, "seconds": time.perf_counter() - started, "cached": reuse})
    sha = world.share_digest(scanned.sha256 if scanned else "")
    if tokenizer is None:  # every rank uses the very tokenizer rank 0 saved
        tokenizer = load_tokenizer(config.tokenizer, work)
    data = tokens.load(out_dir, sha)
    corpus_info = {"sha256": sha, "bytes": scanned.bytes if scanned else 0, "sources": corpus.sources,
                   "encoding": corpus.encoding}
    if not resume:
        torch.manual_seed(config.seed)
        try:
            model_config = ModelConfig(vocab_size=tokenizer.vocab_size, **model_options)
            model_config.validate()
            model = RNNLM(model_config)
        except ValueError as exc:
            raise UsageError(f"{exc}; set --embedding-dim to --hidden-size or drop --tie-weights") from None
        if world.main:
            write_config(work, build_meta(model_config, config, tokenizer, corpus_info))
            _write_index(work, corpus, scanned.bytes, emit)
            _write_ngram(work, data.train, tokenizer, emit)
    else:
        model = RNNLM(model_config)

    val_ids = torch.cat([torch.tensor([tokenizer.eos_id]), torch.from_numpy(data.val[: config.val_tokens].astype(np.int64))])
    val_chars = data.val_chars
    val_chars_per_token = val_chars / max(1, len(data.val))  # bits/char from nats/token
    val_eval_ids = val_ids
    batches = BatchStream(data.train, config.batch_size, config.seq_len, config.seed, shard=(world.rank, world.size))
    if saved is None:
        model.init_output_bias(torch.from_numpy(data.counts))
    model.to(dev)
    opt = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    # each rank reads its share of the streams; DDP averages the gradients, so the step equals a
    # single process's step on the whole global batch
    forward = model if world.size == 1 else DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    step, elapsed, best, bad_evals, plateau_scale, hidden = 0, 0.0, math.inf, 0, 1.0, None
    if saved is not None:
        _check_saved_shapes(out_dir, saved, model)
        try:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            batches.pos = Position(**saved["position"])
            step, elapsed, best = saved["step"], saved["elapsed"], saved["best"]
            bad_evals, plateau_scale = saved["bad_evals"], saved["plateau_scale"]
            hidden = tuple(batches.my_rows(t).to(dev) for t in saved["hidden"]) if saved["hidden"] else None
            if model_config.rnn_type != "lstm" and hidden is not None:
                hidden = hidden[0]
            torch.set_rng_state(saved["rng"])
            if new_corpus:  # fine-tuning: same weights and optimizer, new text from its start
                batches.pos, hidden, best, bad_evals = Position(), None, math.inf, 0
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise ModelError(f"cannot resume from {out_dir / TRAINER_FILE}: it does not match this model "
                             f"({str(exc).splitlines()[0][:200]})") from None
        if world.main:  # a kill after the last save may have logged later validations: they will come again
            _truncate_metrics(out_dir / METRICS_FILE, step)

    if resume and not new_corpus and world.main and not (out_dir / NGRAM_FILE).exists():
        _write_ngram(out_dir, data.train, tokenizer, emit)  # a model from before n-grams: it gets one now
    if resume and new_corpus and world.main:
        unknown = int(data.counts[tokenizer.unk_id])
        emit("info", {"message": f"fine-tuning on new text: {unknown:,} of its {len(data.train):,} training tokens "
                                 "are outside the model's vocabulary and read as unknown"})
        meta = read_config(out_dir)
        meta["corpus"], meta["fine_tuned_from_corpus"] = corpus_info, meta.get("corpus")
        write_config(out_dir, meta)
        _write_index(out_dir, corpus, scanned.bytes, emit, before=CorpusIndex.load(out_dir))  # the model knows both
        _write_ngram(out_dir, data.train, tokenizer, emit)  # the counts follow the new text
    amp = autocast(dev, dtype)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)  # fp16's range needs loss scaling
    if saved is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    chars_per_token = data.train_chars / max(1, len(data.train))
    total_steps = _total_steps(config, batches.windows_per_epoch)
    emit("start", {
        "directory": str(out_dir), "device": str(dev), "precision": str(dtype).removeprefix("torch."),
        "params": sum(p.numel() for p in model.parameters()), "train_tokens": len(data.train),
        "val_chars": val_chars, "vocab_size": tokenizer.vocab_size, "batch_size": batches.batch_size,
        "processes": world.size,
        "seq_len": batches.seq_len, "total_steps": total_steps, "time_limit": config.time_limit, "step": step,
    })

    def progress_now() -> float:
        if total_steps:
            return step / total_steps
        return elapsed / config.time_limit if config.time_limit else 0.0

    saved_step = step if saved is not None else None

    def diverged(what: str) -> Diverged:
        kept = f"the checkpoint of step {saved_step} is kept" if saved_step is not None else "nothing was saved"
        return Diverged(f"training diverged after step {step}: {what}; {kept}. Lower --lr (now {config.lr:g}) "
                        "or --grad-clip and train again")

    def checkpoint() -> None:
        nonlocal work, saved_step
        gathered = [] if hidden is None else [world.gather_rows(t) for t in (hidden if isinstance(hidden, tuple) else (hidden,))]
        if not world.main:
            return
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise diverged("the weights became nan or inf")
        if not (work / WEIGHTS_FILE).exists():  # no validation yet: the latest weights are the best we know
            save_weights(work, model)
        save_trainer_state(work, {
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "position": {"epoch": batches.pos.epoch, "window": batches.pos.window},
            "step": step, "elapsed": elapsed, "best": best, "bad_evals": bad_evals,
            "plateau_scale": plateau_scale, "rng": torch.get_rng_state(), "scaler": scaler.state_dict(),
            "hidden": gathered,  # (layers, global batch, hidden): the same layout for any number of processes
        })
        if work != out_dir:  # the first complete save of a fresh run: it replaces what out_dir held
            commit(out_dir)
            work = out_dir
        saved_step = step

    def evaluate_now(train_loss: float, chars_per_sec: float) -> dict[str, Any]:
        nonlocal best, bad_evals, plateau_scale
        record: dict[str, Any] = {"step": step, "epoch": round(step / batches.windows_per_epoch, 3),
                                  "elapsed": round(elapsed, 1), "train_loss": round(train_loss, 4),
                                  "lr": opt.param_groups[0]["lr"], "chars_per_sec": round(chars_per_sec)}
        if val_chars:
            nats, n = world.sum(list(sum_nll(model, _share(val_eval_ids, world), amp=amp)))
            val_loss = nats / n
            record.update(val_loss=round(val_loss, 4), val_bpc=round(val_loss / val_chars_per_token / math.log(2), 4))
        else:  # no held-out text: the latest weights are the best we know
            val_loss = -step
        if not math.isfinite(val_loss):
            raise diverged(f"the validation loss became {val_loss}")
        if val_loss < best - 1e-4:  # a real improvement, not float noise
            best, bad_evals = val_loss, 0
            if world.main:
                save_weights(work, model)
            record["saved"] = True
        else:
            bad_evals += 1
            if config.lr_schedule == "plateau" and bad_evals % 2 == 0:
                plateau_scale *= 0.5
        if world.main:
            append_line(work / METRICS_FILE, json.dumps(record, allow_nan=False))
            record["preview"] = _preview(model, tokenizer, config.seed + step)
            model.train()
        return record

    model.train()
    stop_reason, losses, window_chars, window_time = "", [], 0, 0.0
    last_eval_step = step if saved is not None else -1
    while True:
        if world.size > 1:  # every rank stops on the same step: rank 0's clock decides
            elapsed = world.sum([elapsed if world.main else 0.0])[0]
        reason = _budget_reason(config, step, elapsed, total_steps, bad_evals)
        if reason:
            stop_reason = reason
            break
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = config.lr * lr_factor(config, step, progress_now(), plateau_scale)
        x, y, fresh = batches.next()
        if fresh:
            hidden = None  # a new epoch starts the streams afresh
        if dev.type == "cuda":  # page-locked, so the copy runs alongside the GPU's work
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with amp:
            _, hidden, loss = forward(x, hidden, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # clip the true gradients
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
        loss_value = loss.item()
        if not scaler.is_enabled() and not math.isfinite(norm):
            loss_value = norm  # a non-finite gradient would make every weight nan: stop before the update
        flags = [float(should_stop()), loss_value]
        stop_now, loss_value = world.sum(flags) if world.size > 1 else flags  # every rank decides alike
        if not math.isfinite(loss_value):
            raise diverged(f"the loss or its gradient became {loss_value}")
        scaler.step(opt)  # skipped when fp16 gradients overflowed; the scale then shrinks
        scaler.update()
        hidden = _detach(hidden)
        step += 1
        losses.append(loss_value / world.size)
        dt = time.perf_counter() - t0
        elapsed += dt
        window_chars += x.numel() * chars_per_token * world.size  # the whole job's speed
        window_time += dt
        cps = window_chars / window_time if window_time else 0.0
        emit("step", {"step": step, "total_steps": total_steps, "train_loss": losses[-1], "chars_per_sec": cps,
                      "elapsed": elapsed, "progress": progress_now()})
        if stop_now:
            stop_reason = "interrupted"
            break
        if step % config.eval_every == 0:
            t0 = time.perf_counter()
            record = evaluate_now(sum(losses[-20:]) / len(losses[-20:]), cps)
            elapsed += time.perf_counter() - t0
            last_eval_step = step
            checkpoint()
            emit("eval", record)
            window_chars, window_time = 0, 0.0
    if stop_reason != "interrupted" and last_eval_step != step and losses:
        emit("eval", evaluate_now(sum(losses[-20:]) / len(losses[-20:]), 0.0))
    checkpoint()
    world.barrier()
    if not world.main:
        return TrainResult(out_dir, step, stop_reason, None, None)
    best_loss = best if val_chars and best < math.inf else None
    best_bpc = None
    if best_loss is not None:
        best_bpc = best_loss / val_chars_per_token / math.log(2)
    meta = read_config(out_dir)
    meta["result"] = {"steps": step, "stop_reason": stop_reason, "best_val_loss": best_loss,
                      "best_val_bpc": best_bpc, "train_seconds": round(elapsed, 1)}
    if stop_reason != "interrupted" and best_loss is not None:
        emit("info", {"message": "fitting song memory on the validation songs"})
        mix, figures = _fit_song_memory(out_dir, dev, val_ids, val_chars_per_token, amp)
        meta["song_memory"] = mix.to_dict()
        meta["result"].update(figures)
    write_config(out_dir, meta)
    result = TrainResult(out_dir, step, stop_reason, best_loss, best_bpc, meta["result"].get("val_bpc"),
                         meta["result"].get("val_bpc_base"))
    emit("done", {"steps": step, "stop_reason": stop_reason, "best_val_bpc": best_bpc, "val_bpc": result.val_bpc})
    return result


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
                             f"but {out_dir / 'config.json'} makes it {tuple(want.shape)}; the files come from different runs")


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


def _write_ngram(directory: Path, train_ids: np.ndarray, tokenizer, emit: ProgressFn) -> None:
    """Keep the training ids for the n-gram the network is mixed with (none for very large corpora)."""
    (directory / NGRAM_FILE).unlink(missing_ok=True)
    if len(train_ids) > MAX_NGRAM_TOKENS:
        emit("info", {"message": f"over {MAX_NGRAM_TOKENS:,} training tokens: no n-gram is mixed in"})
        return
    ids = np.concatenate([[tokenizer.eos_id], np.asarray(train_ids, dtype=np.int64)])  # every song starts after an end
    KneserNey.save_ids(directory, ids, tokenizer.vocab_size)


def _fit_song_memory(out_dir: Path, device: torch.device, val_ids: torch.Tensor, chars_per_token: float, amp):
    """Fit the mixture weights on the validation ids with the saved (best) model; returns them and bits/char figures."""
    loaded = load_model(out_dir, device)
    ngram = loaded.ngram
    scored = memory.parts(loaded.model, ngram, val_ids, loaded.tokenizer.eos_id, amp)
    mix = memory.fit(scored, ngram.order if ngram else 1)
    chars = (val_ids.numel() - 1) * chars_per_token
    figures = {"val_bpc": scored.bits(mix, True, chars), "val_bpc_base": scored.bits(mix, False, chars),
               "val_bpc_network": scored.bits(None, False, chars)}
    return mix, {k: round(v, 4) for k, v in figures.items()}


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
    g = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    out = []
    for ids in generate_ids(model, [tokenizer.eos_id], length, SamplingSettings(0.8), g, banned=(tokenizer.unk_id,)):
        if int(ids[0]) == tokenizer.eos_id:
            break
        out.append(int(ids[0]))
    return tokenizer.decode(out)
