"""Upload a fused model directory to the Hugging Face Hub with the real ``huggingface_hub`` client.

The token comes from wherever huggingface_hub looks (``HF_TOKEN``, a saved ``hf auth login``);
nrt-mlx never reads it into a message, prints it or logs it. ``HF_ENDPOINT`` is honoured at call
time. Name, authentication and network problems become one-line ``NrtError`` messages.
"""

from __future__ import annotations

import os
from pathlib import Path

from nrt_mlx.errors import NrtError
from nrt_mlx.export.manifest import MANIFEST

COMMIT_MESSAGE = "Upload model fused with nrt-mlx"


def check_repo_id(repo_id: str) -> None:
    """Raise a one-line error unless ``repo_id`` is a valid Hub model id (``[owner/]name``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id or repo_id.count("/") > 1:
        raise NrtError(
            f"repo id '{repo_id}': expected 'owner/name' (or 'name' for your own account)"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise NrtError(
            f"repo id '{repo_id}' is not a valid Hub name: use letters, digits, '-', '_' and '.', "
            "no '--' or '..', at most 96 characters, as 'owner/name'"
        ) from None


def files_to_upload(folder: Path) -> list[str]:
    """The files ``upload_folder`` sends, relative POSIX paths: it skips .git, HF caches and
    nrt-mlx's own manifest of the output folder."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    root = folder.expanduser().resolve()
    paths = [p.relative_to(root).as_posix() for p in sorted(root.glob("**/*")) if p.is_file()]
    ignore = [*DEFAULT_IGNORE_PATTERNS, MANIFEST]
    return list(filter_repo_objects(paths, ignore_patterns=ignore))


def hub_endpoint() -> str:
    """The Hub URL: ``HF_ENDPOINT`` as set now, else huggingface_hub's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def upload_folder_to_hub(
    folder: str | Path, repo_id: str, private: bool = False, dry_run: bool = False
) -> list[str]:
    """Create ``repo_id`` if needed and upload every file of ``folder``; returns the files' paths.

    ``dry_run`` checks the folder and the name and returns the files without contacting the Hub.
    ``private`` applies when the repository is created; an existing repository keeps its setting.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NrtError(f"{folder}: no such directory; fuse a run into it first with 'nrt-mlx fuse'")
    check_repo_id(repo_id)
    files = files_to_upload(folder)
    if not files:
        raise NrtError(f"{folder}: the directory is empty; nothing to upload")
    if "config.json" not in files:
        raise NrtError(
            f"{folder}: no config.json; is this a model directory written by 'nrt-mlx fuse'?"
        )
    if dry_run:
        return files
    _upload(folder, repo_id, private)
    return files


def _upload(folder: Path, repo_id: str, private: bool) -> None:
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if token is None:
        raise NrtError(
            "not logged in to the Hugging Face Hub: run 'hf auth login' or set HF_TOKEN "
            "to a token with write access"
        )
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint)
    try:
        # None leaves the visibility to the Hub (public, or the organisation's default).
        url = api.create_repo(
            repo_id, private=True if private else None, exist_ok=True, repo_type="model"
        )
        api.upload_folder(
            repo_id=url.repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=COMMIT_MESSAGE,
            ignore_patterns=[MANIFEST],  # nrt-mlx's own record of the folder
        )
    except Exception as err:
        raise hub_error(err, repo_id, endpoint, token) from None


def hub_error(err: Exception, repo_id: str, endpoint: str, token: str | None) -> NrtError:
    """One line saying what went wrong and what to do; the token is scrubbed from any detail."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    where = f"upload to {repo_id}"
    if isinstance(err, OfflineModeIsEnabled):
        return NrtError(f"{where}: HF_HUB_OFFLINE is set; unset it to upload")
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        return _http_error(where, err, token)
    if _is_network_error(err):
        return NrtError(
            f"{where}: could not reach {endpoint} ({type(err).__name__}); "
            "check your network connection (and HF_ENDPOINT if you set it)"
        )
    detail = _scrub(_one_line(str(err)), token)
    if isinstance(err, ValueError) and "metadata" in detail:
        return NrtError(
            f"{where}: the Hub rejected README.md's metadata ({detail}); fix the model card"
        )
    return NrtError(f"{where} failed: {type(err).__name__}: {detail}")


def _http_error(where: str, err: Exception, token: str | None) -> NrtError:
    status = err.response.status_code
    server = _scrub(_one_line(getattr(err, "server_message", None) or ""), token)
    said = f": {server}" if server else ""
    if status == 401:
        return NrtError(
            f"{where}: the Hub rejected your token (HTTP 401); run 'hf auth login' again or set "
            "HF_TOKEN to a valid token with write access"
        )
    if status == 403:
        return NrtError(
            f"{where}: your token may not write there (HTTP 403{said}); use a token with write "
            "access to that namespace, or upload under your own account"
        )
    if status == 404:
        return NrtError(
            f"{where}: repository not found (HTTP 404); check the repo id and that your token can see it"
        )
    if status in (400, 409, 422):
        return NrtError(
            f"{where}: the Hub refused it (HTTP {status}{said}); check the repo id and the files"
        )
    if status == 429 or status >= 500:
        return NrtError(f"{where}: the Hub is unavailable or busy (HTTP {status}); try again later")
    return NrtError(f"{where}: HTTP {status}{said}")


def _is_network_error(err: Exception) -> bool:
    if isinstance(err, (ConnectionError, TimeoutError, OSError)):
        return True
    try:
        import httpx2
    except ImportError:  # older huggingface_hub releases use requests or httpx
        httpx2 = None
    if httpx2 is not None and isinstance(err, httpx2.TransportError):
        return True
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(
        names & {"TransportError", "ConnectError", "ConnectionError", "Timeout", "TimeoutException"}
    )


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 200 else line[:197] + "..."


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text
