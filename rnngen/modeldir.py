"""Model directories: config.json + model.safetensors + tokenizer (+ trainer.pt to resume).

Everything is data: weights are safetensors, the trainer state loads with weights_only=True,
and every file is written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import torch

from rnngen import __version__, metadata
from rnngen.config import ModelConfig, TrainConfig, to_dict
from rnngen.errors import ModelError, UsageError
from rnngen.files import atomic_write, fsync_dir
from rnngen.memory import Mixture
from rnngen.model import RNNLM, parameter_shapes
from rnngen.layout import (COMPLETE_MARK, CONFIG_FILE, FORMAT_VERSION, LOCK_FILE, MODEL_FILES,
                           STAGING_DIR, TOKENS_DIR, TRAINER_FILE, WEIGHTS_FILE)
from rnngen.ngram import KneserNey
from rnngen.tokenizer import Tokenizer, load_tokenizer
from rnngen.tokencache import is_cache_file


@dataclass
class LoadedModel:
    model: RNNLM
    tokenizer: Tokenizer
    directory: Path
    meta: dict[str, Any] = field(default_factory=dict)  # the whole config.json

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.meta.get("train", {}))

    @cached_property
    def mixture(self) -> Mixture | None:
        """The fitted song-memory weights (None: the network alone, as models before them), parsed once."""
        data = self.meta.get("mixture", self.meta.get("song_memory"))  # "song_memory": before rnngen 0.2
        if data is None:
            return None
        try:
            return Mixture.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{self.directory / CONFIG_FILE} is damaged: song_memory: {exc}") from None

    @cached_property
    def ngram(self) -> KneserNey | None:
        """The n-gram the network is mixed with, counted on first use (about a second per 2 M tokens)."""
        return KneserNey.load(self.directory, self.tokenizer.vocab_size)

    def for_validation(self) -> "LoadedModel":
        """This model with the n-gram of its training songs alone, to score its own validation songs
        (training ends by adding them to the n-gram it samples with)."""
        held = LoadedModel(self.model, self.tokenizer, self.directory, self.meta)
        held.ngram = KneserNey.load(self.directory, self.tokenizer.vocab_size, training_only=True)
        return held


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold train.lock in `directory`: an OS file lock (filelock), which dies with its process."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(directory / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ModelError(f"{directory} is being trained by another rnngen process; wait for it to finish "
                         "or train into another directory") from None
    except OSError as exc:
        raise ModelError(f"cannot write in {directory}: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        lock.release()


# ---- a model directory's life: a new run is built beside the old model and swapped in -----------
#
# A run that starts afresh (a new directory, or --force over an old model) writes its files into
# STAGING_DIR inside the model directory. At its first complete save (weights and trainer.pt) it
# writes the list of its files to STAGING_DIR/COMPLETE_MARK and moves them into place; recover()
# finishes that move after a kill. Until then the old model stays whole, and a killed run leaves
# only STAGING_DIR, which the next run clears.


def is_model_dir(directory: Path) -> bool:
    """Whether `directory` holds a model rnngen wrote (or one whose swap into place a kill interrupted)."""
    if (directory / STAGING_DIR / COMPLETE_MARK).is_file():
        return True
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("format_version"), int) and "model" in meta


def is_exported(directory: Path) -> bool:
    """Whether `directory` holds a model made by `rnngen export` (weights only, no training state)."""
    try:
        return "exported" in read_config(directory)
    except ModelError:
        return False


def foreign_entries(directory: Path) -> list[str]:
    """The names in `directory` rnngen did not write (for a directory that holds no model)."""
    names = []
    for entry in sorted(directory.iterdir()):
        if entry.name in (LOCK_FILE, STAGING_DIR):
            continue
        if entry.name == TOKENS_DIR and entry.is_dir() and all(is_cache_file(p.name) for p in entry.iterdir()):
            continue
        names.append(entry.name)
    return names


def check_out_dir(out_dir: Path, resume: bool, force: bool) -> bool:
    """Whether a training run in `out_dir` resumes (True) or starts afresh (False).

    Refuses what would lose data: replacing a model without --force, or writing into a folder
    of the user's files (with --force only beside them, never over one of them)."""
    if not out_dir.exists():
        if resume:
            raise ModelError(_nothing_to_resume(out_dir))
        return False
    if not out_dir.is_dir():
        raise ModelError(f"{out_dir} exists and is not a directory; choose another --name or --out")
    if is_model_dir(out_dir):
        if not (resume or force):
            raise ModelError(f"{out_dir} already holds a model; use --resume to continue it, --force to start "
                             "over, or another --name / --out for a new one")
        if resume and is_exported(out_dir):
            raise ModelError(f"{out_dir} is an exported model: it has no training state ({TRAINER_FILE}), so it cannot "
                             f"be resumed; start a new model from it with --from {out_dir} --name NEW, resume the "
                             "model it was exported from, or start over with --force")
        if resume and not any((d / TRAINER_FILE).is_file() for d in (out_dir, out_dir / STAGING_DIR)):
            raise ModelError(f"{out_dir} holds a model but no training state ({TRAINER_FILE}) to resume from (a copy "
                             f"or a model trained elsewhere); start a new model from it with --from {out_dir} "
                             "--name NEW, or start over with --force")
        return resume
    foreign = foreign_entries(out_dir)
    if resume and not (out_dir / STAGING_DIR).is_dir():  # a started run that never saved: begin again
        raise ModelError(_nothing_to_resume(out_dir))
    if foreign and not force:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ModelError(f"{out_dir} is not empty ({shown}) and holds no rnngen model; train into a new or empty "
                         "directory, or add --force to put the model beside these files")
    clash = [n for n in foreign if n in MODEL_FILES or (n == TOKENS_DIR and not (out_dir / n).is_dir())]
    if clash:
        raise ModelError(f"{out_dir / clash[0]} was not written by rnngen and training would replace it; "
                         "move it away or train into another directory")
    return False


def _nothing_to_resume(out_dir: Path) -> str:
    from rnngen.home import BUNDLED_NAME, bundled_dir

    if out_dir.name == BUNDLED_NAME and bundled_dir() is not None:
        return (f"nothing to resume in {out_dir}: {BUNDLED_NAME} is the bundled model, read-only and without "
                f"training state; start a new model from it with --from {BUNDLED_NAME} --name NEW")
    return (f"nothing to resume in {out_dir}; train without --resume first, or start a new model from a trained "
            "one with --from NAME")


def begin(out_dir: Path, fresh: bool) -> Path:
    """The directory this run writes to: a clean STAGING_DIR for a fresh run, else `out_dir` itself.
    Clears what an earlier run left unfinished (under the lock: nobody else is writing)."""
    import shutil

    recover(out_dir)
    staging = out_dir / STAGING_DIR
    if staging.exists():
        shutil.rmtree(staging)  # a run killed before its first save: only its own files are in there
    if not fresh:
        return out_dir
    try:
        staging.mkdir()
    except OSError as exc:
        raise ModelError(f"cannot write in {out_dir}: {exc.strerror or exc}") from None
    return staging


def abandon(out_dir: Path) -> None:
    """A fresh run that ends before its first save leaves nothing behind."""
    import shutil

    staging = out_dir / STAGING_DIR
    if staging.is_dir() and not (staging / COMPLETE_MARK).exists():
        shutil.rmtree(staging, ignore_errors=True)


def commit(out_dir: Path) -> None:
    """Swap a fresh run's first complete save into place (the old model's files go)."""
    staging = out_dir / STAGING_DIR
    names = [n for n in MODEL_FILES if (staging / n).exists()]
    atomic_write(staging / COMPLETE_MARK, json.dumps(names).encode("utf-8"))
    recover(out_dir)


def recover(out_dir: Path) -> None:
    """Finish a commit() that a kill interrupted; does nothing otherwise. Safe to repeat."""
    staging = out_dir / STAGING_DIR
    mark = staging / COMPLETE_MARK
    try:
        names = json.loads(mark.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise ModelError(f"{mark} is damaged ({exc}); remove {staging} to keep the previous model") from None
    try:
        for name in MODEL_FILES:
            if name not in names:
                (out_dir / name).unlink(missing_ok=True)  # the old model's file that the new one does not have
            elif (staging / name).exists():
                os.replace(staging / name, out_dir / name)
        fsync_dir(out_dir)
        mark.unlink()
        staging.rmdir()
    except OSError as exc:
        raise ModelError(f"cannot finish saving the model in {out_dir}: {exc.strerror or exc}") from None


def remove_if_only_ours(out_dir: Path) -> None:
    """Remove a directory this run created when nothing of a model is in it (a run that failed early)."""
    try:
        if not out_dir.is_dir() or foreign_entries(out_dir) or (out_dir / STAGING_DIR).exists():
            return
        remove_token_cache(out_dir)
        (out_dir / LOCK_FILE).unlink(missing_ok=True)
        out_dir.rmdir()
    except OSError:
        pass  # best effort: what remains is still only rnngen's


def remove_token_cache(directory: Path) -> None:
    """Delete the token cache's own files, and its folder when nothing else is in it."""
    tokens = directory / TOKENS_DIR
    if tokens.is_dir():
        for p in tokens.iterdir():
            if is_cache_file(p.name):
                p.unlink()
        if not any(tokens.iterdir()):
            tokens.rmdir()


def write_config(directory: Path, meta: dict[str, Any]) -> None:
    rest = {k: v for k, v in meta.items() if k not in ("format_version", "rnngen_version")}
    meta = {"format_version": FORMAT_VERSION, "rnngen_version": __version__, **rest}
    text = json.dumps(meta, ensure_ascii=False, indent=2, allow_nan=False)
    # a file name that is not valid UTF-8 holds lone surrogates (Python's surrogateescape): written as
    # JSON escapes ("\udce9"), they read back as the same name
    atomic_write(directory / CONFIG_FILE, text.encode("utf-8", "backslashreplace"))


def build_meta(model_config: ModelConfig, train_config: TrainConfig, tokenizer: Tokenizer, corpus: dict) -> dict:
    return {
        "model": to_dict(model_config.sized(None)),  # resolved: training has sized them already
        "train": to_dict(train_config.sized(None)),
        "tokenizer": tokenizer.kind,
        "corpus": corpus,
    }


def save_weights(directory: Path, model: RNNLM) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = next((k for k, v in tensors.items() if not torch.isfinite(v).all()), None)
    if bad is not None:  # never replace good weights with diverged ones
        raise ModelError(f"not saving {directory / WEIGHTS_FILE}: {bad} holds non-finite values (nan or inf)")
    if model.config.tie_weights:
        tensors.pop("head.weight")  # the same tensor as embedding.weight
    atomic_write(directory / WEIGHTS_FILE, save(tensors))


def save_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(directory / TRAINER_FILE, buf.getvalue())


def load_trainer_state(directory: Path) -> dict[str, Any]:
    path = directory / TRAINER_FILE
    if not path.exists():
        raise ModelError(f"{directory} has no {TRAINER_FILE} to resume from; start a new model from it with "
                         f"--from {directory} --name NEW, or start over with --force")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means a damaged or foreign file
        raise ModelError(f"cannot resume from {path}: {str(exc).splitlines()[0][:200]}") from None


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{directory} is not a model directory (no {CONFIG_FILE})") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); the model directory is damaged") from None
    except RecursionError:
        raise ModelError(f"{path} is damaged: nested too deeply") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ModelError(
            f"{path} uses model format {version}, newer than this rnngen {__version__} reads ({FORMAT_VERSION}); "
            "upgrade rnngen"
        )
    try:
        return metadata.check(meta)
    except metadata.Damaged as exc:
        raise ModelError(f"{path} is damaged: {exc}") from None


def load_model(directory: Path, device: torch.device | str = "cpu") -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        recover(directory)  # a kill while a new run's first save was swapped in: finish the swap
    except ModelError:
        pass  # read-only (the bundled model, a shared copy): read what is there
    meta = read_config(directory)
    try:
        model_config = ModelConfig.from_dict(meta["model"])
        model_config.validate()
        tokenizer = load_tokenizer(meta["tokenizer"], directory)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{directory / CONFIG_FILE} is damaged: bad or missing {exc}") from None
    except UsageError as exc:  # sizes no training could have written
        raise ModelError(f"{directory / CONFIG_FILE} is damaged: {exc}") from None
    if tokenizer.vocab_size != model_config.vocab_size:
        raise ModelError(
            f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens but the model expects "
            f"{model_config.vocab_size}; the directory mixes files from different models"
        )
    path = directory / WEIGHTS_FILE
    try:
        _check_weights(path, model_config)  # before anything of the configured size is allocated
        tensors = load_file(path)
    except FileNotFoundError:
        raise ModelError(f"{path} is missing; the model has not finished its first save") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path} is damaged ({exc})") from None
    bad = next((name for name, t in tensors.items() if not torch.isfinite(t).all()), None)
    if bad is not None:
        raise ModelError(f"{path}: tensor {bad} holds nan or inf values (the training diverged); "
                         "train again with a lower --lr")
    if model_config.tie_weights and "embedding.weight" in tensors:
        tensors["head.weight"] = tensors["embedding.weight"]
    model = RNNLM(model_config)
    try:
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
    except RuntimeError as exc:
        raise ModelError(f"{path} does not match {CONFIG_FILE}: {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, directory=directory, meta=meta)


def _check_weights(path: Path, config: ModelConfig) -> None:
    """Compare the tensor names, shapes and dtypes in the file's header with the model `config`
    describes (built on the meta device: no memory), so a wrong config cannot make us allocate."""
    from safetensors import safe_open

    expected = parameter_shapes(config)
    with safe_open(path, framework="pt") as f:
        found = {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    if config.tie_weights and "embedding.weight" in found:
        found.setdefault("head.weight", found["embedding.weight"])  # saved once, shared
    for name, shape in expected.items():
        if name not in found:
            raise ModelError(f"{path} lacks tensor {name}; it does not match {CONFIG_FILE}")
        got, dtype = found[name]
        if not dtype.startswith(("F", "BF")):
            raise ModelError(f"{path}: tensor {name} holds {_dtype_name(dtype)} values, expected floating point")
        if got != shape:
            raise ModelError(f"{path}: tensor {name} has shape {got}, expected {shape} from {CONFIG_FILE}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ModelError(f"{path} holds tensor {extra[0]}, which the model in {CONFIG_FILE} lacks; they do not match")


def _dtype_name(code: str) -> str:
    """safetensors' dtype codes as torch names: I64 -> int64, BF16 -> bfloat16, BOOL -> bool."""
    code = code.lower()
    for short, name in (("bf", "bfloat"), ("f", "float"), ("i", "int"), ("u", "uint")):
        if code.startswith(short) and code[len(short):][:1].isdigit():
            return name + code[len(short):]
    return code
