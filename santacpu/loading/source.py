"""Where a model comes from: a local folder, a weight file inside one, or a model hub id.

Hub ids go through huggingface_hub's standard cache (so `HF_HUB_OFFLINE=1`, `HF_HOME` and
`HF_HUB_CACHE` work as everywhere else). Only what santacpu reads is fetched: config.json,
tokenizer.json and the safetensors weights (pytorch_model.bin only when a repo has no safetensors).

May import: huggingface_hub, `santacpu.errors`, `santacpu.settings`, `santacpu.paths`.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from ..errors import SantacpuError, SantacpuWarning
from ..settings import MODEL_ENV, Settings
from ..paths import user_path

DEFAULT_MODEL = "bigcode/santacoder"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_META_FILES = ["config.json", "tokenizer.json"]
_SAFETENSORS_FILES = ["*.safetensors", "model.safetensors.index.json"]
_TORCH_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def default_model() -> str:
    """The model the CLI runs when told none: $SANTACPU_MODEL, else DEFAULT_MODEL. A variable that
    names a local path that does not exist is an error naming the variable (where the path came
    from is the first thing to check)."""
    value = Settings.from_environment().model
    if value is None:
        return DEFAULT_MODEL
    if not user_path(value).exists() and looks_like_a_path(value):
        raise SantacpuError(
            f"{MODEL_ENV}={value}: no such file or folder (the variable names the model run when --model "
            f"is not given; unset it for {DEFAULT_MODEL})"
        )
    return value


def looks_like_a_path(text: str) -> bool:
    """Whether `text` can only be a local path, never a hub id."""
    return not _HUB_ID.match(text) or text.startswith((".", "/", "~"))


def hub_revision(model: str | os.PathLike, revision: str | None) -> str | None:
    """`revision` where `model` is a hub id; None, with a warning, where it names a local file or
    folder (a revision only picks among a hub repository's versions)."""
    if revision is not None and user_path(model).exists():
        warnings.warn(
            f"revision '{revision}' is ignored: {model} is a local file or folder, not a hub id",
            SantacpuWarning,
            stacklevel=3,
        )
        return None
    return revision


def resolve(model: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint folder for `model` (downloading from the hub into its cache if needed)."""
    path = user_path(model)
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent  # a weight file: config.json and tokenizer.json sit beside it
    check_local(model)
    return _download(str(model), revision)


def check_local(model: str | os.PathLike) -> None:
    """Refuse, before any long work, a `model` that names a local path where nothing a model is
    read from lies; a hub id passes (whether the hub has it is found out by downloading)."""
    path, text = user_path(model), str(model)
    if path.exists() and not (path.is_dir() or path.is_file()):  # a FIFO, a device, a socket
        raise SantacpuError(f"{text} is neither a file nor a folder (a model is a folder, a weight file or a quantized file)")
    if not path.exists() and looks_like_a_path(text):
        raise SantacpuError(f"no such file or folder: {text}")


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"'{repo_id}'" + (f" (revision {revision})" if revision else "")
    offline_hint = (
        f"{where} is not a local folder, and it is not in the hub cache while the model hub cannot be "
        f"reached; download it on a connected machine (or copy its folder here) and give that folder in its place "
        f"(e.g. /path/to/{repo_id.split('/')[-1]}); or, to try santacpu offline on random weights: "
        f"santacpu random-checkpoint /tmp/tiny, then give /tmp/tiny"
    )
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_META_FILES + _SAFETENSORS_FILES))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_META_FILES + _TORCH_FILES))
    except GatedRepoError:
        raise SantacpuError(f"{where} is gated on the hub: accept its terms and log in (huggingface-cli login)") from None
    except RepositoryNotFoundError:
        raise SantacpuError(f"no model {where} on the hub, and no such local folder") from None
    except RevisionNotFoundError:
        raise SantacpuError(f"the hub has no revision '{revision}' of '{repo_id}'") from None
    except LocalEntryNotFoundError:
        raise SantacpuError(offline_hint) from None
    except (HfHubHTTPError, OSError) as problem:
        if "offline" in str(problem).lower() or isinstance(problem, OSError):
            raise SantacpuError(offline_hint) from None
        raise SantacpuError(f"model hub error for {where}: {str(problem).splitlines()[0]}") from None
    return folder
