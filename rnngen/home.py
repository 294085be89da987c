"""Where models live: the model home (RNNGEN_HOME, else the per-user data directory) and the
bundled model, and how a name given to --model becomes a directory."""

from __future__ import annotations

import os
import re
from pathlib import Path

from rnngen.errors import ModelError, UsageError
from rnngen.layout import CONFIG_FILE, WEIGHTS_FILE

HOME_VARIABLE = "RNNGEN_HOME"
BUNDLED_NAME = "songci"
NAME_PATTERN = re.compile(r"[\w.\-]+")


def home() -> Path:
    """The directory that holds models by name: $RNNGEN_HOME, else the per-user data directory
    (~/.local/share/rnngen/models on Linux, ~/Library/Application Support/rnngen/models on macOS,
    %LOCALAPPDATA%\\rnngen\\models on Windows)."""
    value = os.environ.get(HOME_VARIABLE, "").strip()
    if value:
        return Path(value).expanduser()
    from platformdirs import user_data_path

    return user_data_path("rnngen", appauthor=False) / "models"


def check_name(name: str, command: str = "train") -> str:
    """`name` if it can name a directory in the model home, else UsageError (worded for `command`:
    train takes --name, the others a NAME)."""
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        if command == "train":
            raise UsageError(f"--name {name!r} is not a model name: use letters, digits, '.', '_' and '-' "
                             "(or --out for a path)")
        raise UsageError(f"{name!r} is not a model name (letters, digits, '.', '_' and '-'); "
                         "'rnngen models' lists them")
    return name


def default_name(first: str) -> str:
    """A valid model name from the corpus file's name: 'my songs.txt' -> 'my_songs', '歌词.txt' -> '歌词'."""
    if first == "-":
        return "stdin"
    path = Path(first)
    for raw in (path.stem, path.resolve().name):  # '.', '..': the directory's own name
        # spaces, shell characters and undecodable bytes (surrogates) become '_'; no hidden directories
        name = re.sub(r"[^\w.\-]", "_", raw).lstrip(".")
        if name:
            return name
    return "model"


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


def list_models(root: Path | None = None) -> list[Path]:
    """The model directories in the home (or `root`), by name; not the bundled one."""
    root = home() if root is None else root
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if (p / CONFIG_FILE).is_file()), key=lambda p: p.name)


def all_models() -> list[tuple[str, Path]]:
    """(name, directory) of every model the home holds, then the bundled one unless a home model
    of the same name hides it."""
    found = [(p.name, p) for p in list_models()]
    bundled = bundled_dir()
    if bundled is not None and BUNDLED_NAME not in {name for name, _ in found}:
        found.append((BUNDLED_NAME, bundled))
    return found


def is_path(spec: str) -> bool:
    """Whether --model's value is a path (has a separator or starts with '.'), not a name."""
    return os.sep in spec or "/" in spec or spec.startswith(".") or spec.startswith("~")


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """A path, a name in the model home, or (None) the most recently trained model there, else the
    bundled one. A name that is nowhere is an error listing the names there are."""
    if spec is None:
        found = [p for p in list_models() if (p / WEIGHTS_FILE).is_file()]
        if found:
            return max(found, key=lambda p: (p / WEIGHTS_FILE).stat().st_mtime)
        bundled = bundled_dir()
        if bundled is None:
            raise ModelError(f"no trained model in {home()} and no bundled model; run 'rnngen train FILE' first")
        return bundled
    if isinstance(spec, os.PathLike) or is_path(str(spec)):
        path = Path(spec).expanduser()
        if path.is_dir():
            return path  # an explicit path: the user chose where to read
        raise ModelError(f"no model directory at {spec}")
    if NAME_PATTERN.fullmatch(spec) and spec not in (".", ".."):
        for name, directory in all_models():
            if name == spec:
                return directory
    names = [name for name, _ in all_models()]
    known = f"; the models there are: {', '.join(names)}" if names else ""
    hint = ""
    if (Path("models") / spec / CONFIG_FILE).is_file():  # trained by an rnngen that wrote into ./models
        hint = f" (./models/{spec} exists: use --model ./models/{spec}, or set {HOME_VARIABLE}=models)"
    raise ModelError(f"no model named {spec!r} in {home()}{known}{hint}; 'rnngen train FILE --name {spec}' makes one")


def display_name(directory: Path) -> str:
    """How to give `directory` to --model: its name when the home (or the bundled model) holds it,
    else a path that resolve_model reads as one."""
    bundled = bundled_dir()
    if directory.parent.resolve() == home().resolve() or (bundled is not None and directory == bundled):
        return directory.name
    text = str(directory)
    if directory.is_absolute() or text.startswith("."):
        return text
    return os.curdir + os.sep + text  # 'base' alone would be looked up as a name
