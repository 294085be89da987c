"""Model directories: config.json + model.safetensors + tokenizer (+ trainer.pt to resume).

Everything is data: weights are safetensors, the trainer state loads with weights_only=True,
and every file is written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from rnngen import __version__
from rnngen.config import ModelConfig, TrainConfig, to_dict
from rnngen.errors import ModelError
from rnngen.model import RNNLM
from rnngen.tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TRAINER_FILE, METRICS_FILE = "config.json", "model.safetensors", "trainer.pt", "metrics.jsonl"
LOCK_FILE = "train.lock"
BUNDLED_NAME = "songci"


@dataclass
class LoadedModel:
    model: RNNLM
    tokenizer: Tokenizer
    directory: Path
    meta: dict[str, Any] = field(default_factory=dict)  # the whole config.json

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.meta.get("train", {}))


def atomic_write(path: Path, data: bytes) -> None:
    """Write so that `path` always holds either its old or its new content, never a mix."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise ModelError(f"cannot write {path}: {exc.strerror or exc}; the previous version is untouched") from None
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold train.lock (with our pid) in `directory`; a lock left by a dead process is taken over."""
    path = directory / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise ModelError(f"{directory} is being trained by process {pid}; wait for it or use another --name")
            path.unlink(missing_ok=True)  # stale: its owner is gone
            continue
        except OSError as exc:
            raise ModelError(f"cannot write in {directory}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    else:
        raise ModelError(f"cannot take the lock {path}; remove it if no training is running")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_config(directory: Path, meta: dict[str, Any]) -> None:
    rest = {k: v for k, v in meta.items() if k not in ("format_version", "rnngen_version")}
    meta = {"format_version": FORMAT_VERSION, "rnngen_version": __version__, **rest}
    # backslashreplace: a path with undecodable bytes (a lone surrogate) becomes a JSON \udcXX escape, read back exactly
    atomic_write(directory / CONFIG_FILE, json.dumps(meta, ensure_ascii=False, indent=2).encode("utf-8", "backslashreplace"))


def build_meta(model_config: ModelConfig, train_config: TrainConfig, tokenizer: Tokenizer, corpus: dict) -> dict:
    return {
        "model": to_dict(model_config),
        "train": to_dict(train_config),
        "tokenizer": tokenizer.kind,
        "corpus": corpus,
    }


def save_weights(directory: Path, model: RNNLM) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
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
        raise ModelError(f"{directory} has no {TRAINER_FILE} to resume from; train without --resume")
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
    if not isinstance(meta, dict):
        raise ModelError(f"{path} is damaged: expected a JSON object")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise ModelError(f"{path} has no valid format_version; the model directory is damaged")
    if version > FORMAT_VERSION:
        raise ModelError(
            f"{path} uses model format {version}, newer than this rnngen {__version__} reads ({FORMAT_VERSION}); "
            "upgrade rnngen"
        )
    return meta


def load_model(directory: Path, device: torch.device | str = "cpu") -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_config(directory)
    try:
        model_config = ModelConfig.from_dict(meta["model"])
        tokenizer = load_tokenizer(meta["tokenizer"], directory)
        model = RNNLM(model_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{directory / CONFIG_FILE} is damaged: bad or missing {exc}") from None
    if tokenizer.vocab_size != model_config.vocab_size:
        raise ModelError(
            f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens but the model expects "
            f"{model_config.vocab_size}; the directory mixes files from different models"
        )
    path = directory / WEIGHTS_FILE
    try:
        tensors = load_file(path)
    except FileNotFoundError:
        raise ModelError(f"{path} is missing; the model has not finished its first save") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path} is damaged ({exc})") from None
    if model_config.tie_weights and "embedding.weight" in tensors:
        tensors["head.weight"] = tensors["embedding.weight"]
    expected = model.state_dict()
    for name, value in tensors.items():
        if name in expected and (expected[name].shape != value.shape or not value.is_floating_point()):
            raise ModelError(f"{path}: tensor {name} has shape {tuple(value.shape)}, expected {tuple(expected[name].shape)}")
    try:
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
    except RuntimeError as exc:
        raise ModelError(f"{path} does not match {CONFIG_FILE}: {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, directory=directory, meta=meta)


# ---- finding a model by name -----------------------------------------------------------------


def bundled_dir() -> Path | None:
    """The pretrained model shipped with the package (top-level models/ in the source tree)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("rnngen.bundled")
    except ModuleNotFoundError:
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec else []
    roots.append(str(Path(__file__).resolve().parent.parent / "models"))  # running from a checkout
    for root in roots:
        candidate = Path(root) / BUNDLED_NAME
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    return None


def list_models(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if (p / CONFIG_FILE).is_file()]


def resolve_model(spec: str | None, root: Path = Path("models")) -> Path:
    """A path, a name under `root`, or (None) the most recently trained model, else the bundled one."""
    if spec is None:
        found = [p for p in list_models(root) if (p / WEIGHTS_FILE).is_file()]
        if found:
            return max(found, key=lambda p: (p / WEIGHTS_FILE).stat().st_mtime)
        bundled = bundled_dir()
        if bundled is None:
            raise ModelError("no trained model found in models/ and no bundled model; run 'rnngen train FILE' first")
        return bundled
    path = Path(spec).expanduser()
    if os.sep in spec or "/" in spec or spec.startswith("."):
        if (path / CONFIG_FILE).is_file() or path.is_dir():
            return path  # an explicit path: the user chose where to read
        raise ModelError(f"no model directory at {spec}")
    candidate = (root / spec).resolve()
    if candidate.parent != root.resolve():
        raise ModelError(f"{spec!r} is not a valid model name")
    if candidate.is_dir():
        return candidate
    bundled = bundled_dir()
    if spec == BUNDLED_NAME and bundled is not None:
        return bundled
    names = sorted(p.name for p in list_models(root)) + ([BUNDLED_NAME] if bundled else [])
    known = f" (available: {', '.join(names)})" if names else ""
    raise ModelError(f"no model named {spec!r} in {root}/{known}; run 'rnngen train FILE' first")
