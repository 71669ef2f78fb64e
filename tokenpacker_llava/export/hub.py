"""Pushing a saved model folder to the Hugging Face Hub.

``push_folder`` makes the folder loadable without this package (remote code + ``auto_map``),
writes a model card when there is none, and uploads it, leaving out training leftovers
(``checkpoint-*`` folders, optimizer / scheduler / RNG states, DeepSpeed shards).
``files_to_upload`` lists exactly what would be sent, with the same filtering as
``HfApi.upload_folder``, so it can be checked without a network.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    HTTPError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
)
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from tokenpacker_llava.export.model_card import CARD_NAME, write_model_card
from tokenpacker_llava.export.remote_code import write_remote_code

DEFAULT_COMMIT_MESSAGE = "Upload TokenPacker-LLaVA model"


def _anywhere(*patterns: str) -> tuple[str, ...]:
    # Patterns match paths relative to the folder; `*` also matches `/`, so `*/p` is p in any subfolder.
    return tuple(p for pattern in patterns for p in (pattern, f"*/{pattern}"))


# What training leaves in an output folder that does not belong in a model repository.
IGNORE_PATTERNS: tuple[str, ...] = _anywhere(
    "checkpoint-*",  # Trainer checkpoints (full model + optimizer copies)
    "global_step*",  # DeepSpeed ZeRO shards
    "optimizer*",  # optimizer.pt, optimizer.bin
    "scheduler*",
    "scaler*",
    "rng_state*",  # rng_state.pth, rng_state_<rank>.pth
    "*.pt",  # torch-pickled training states
    "training_args.bin",  # a pickle of the TrainingArguments
    "zero_to_fp32.py",
    "latest",  # DeepSpeed's pointer to its last global_step folder
    "wandb",
    "__pycache__",
    "*.pyc",
)


class HubPushError(RuntimeError):
    """Pushing to the Hub failed; the message says what to do about it."""


def files_to_upload(folder: str | Path) -> list[str]:
    """The folder-relative paths ``push_folder`` would upload, sorted (as ``upload_folder`` filters them)."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a directory")
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
    ignore = [*IGNORE_PATTERNS, *DEFAULT_IGNORE_PATTERNS]
    return list(filter_repo_objects(paths, ignore_patterns=ignore))


def prepare_folder(folder: str | Path, *, repo_id: str | None = None) -> list[str]:
    """Make ``folder`` ready to push: remote code, ``auto_map`` and (if missing) a model card.

    Returns ``files_to_upload(folder)``.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; save the model with save_pretrained first")
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise FileNotFoundError(
            f"{folder} has no model.safetensors(.index.json); save the model with save_pretrained first"
        )
    write_remote_code(folder)
    if not (folder / CARD_NAME).is_file():
        write_model_card(folder, repo_id=repo_id)
    files = files_to_upload(folder)
    if not any(f.endswith(".safetensors") for f in files):
        raise HubPushError(f"no weights left to upload from {folder} after filtering: {files}")
    return files


def _advice(error: Exception, repo_id: str) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, OfflineModeIsEnabled):
        return "offline mode is enabled (HF_HUB_OFFLINE=1); unset it to push"
    if isinstance(error, LocalTokenNotFoundError) or status == 401:
        return "not logged in, or the token is invalid: run `hf auth login`, set HF_TOKEN, or pass token=..."
    if status == 403:
        namespace = repo_id.split("/")[0] if "/" in repo_id else "your account"
        return f"the token has no write access to {namespace!r}: use a token with write permission"
    if isinstance(error, HfHubHTTPError):
        return "the Hub refused the request"
    return "cannot reach the Hub: check the network connection (and HF_ENDPOINT / proxy settings)"


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
) -> str:
    """Upload a saved model folder to the Hub model repository ``repo_id`` (created if needed).

    Writes the remote code (and a model card if the folder has none) first, so the uploaded
    repository loads with ``trust_remote_code=True`` where this package is not installed.
    Returns the repository URL.
    """
    if constants.is_offline_mode():
        raise HubPushError(
            f"cannot push to {repo_id}: offline mode is enabled (HF_HUB_OFFLINE=1); unset it to push"
        )
    if token is None and get_token() is None:
        raise HubPushError(
            f"cannot push to {repo_id}: not logged in to the Hugging Face Hub; "
            "run `hf auth login`, set HF_TOKEN, or pass token=..."
        )
    prepare_folder(folder, repo_id=repo_id)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=url.repo_id,
            folder_path=folder,
            commit_message=commit_message,
            ignore_patterns=list(IGNORE_PATTERNS),
            repo_type="model",
        )
    except HFValidationError as error:
        raise HubPushError(f"invalid repository id {repo_id!r}: {error}") from error
    except (HfHubHTTPError, OfflineModeIsEnabled, LocalTokenNotFoundError, HTTPError, OSError) as error:
        raise HubPushError(f"cannot push to {repo_id}: {_advice(error, repo_id)} ({error})") from error
    return str(url)
