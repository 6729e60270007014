"""``nrt-mlx upload``: the real huggingface_hub client against a local stand-in for the Hub.

The stand-in implements only what ``HfApi.create_repo`` + ``HfApi.upload_folder`` call
(huggingface_hub 1.x/2.x, hf_xet installed): ``POST /api/repos/create``, ``POST /api/validate-yaml``,
``POST /api/models/{repo}/preupload/{rev}`` and ``POST /api/models/{repo}/commit/{rev}`` (an
NDJSON commit; every file is answered "regular", so its bytes arrive base64-encoded in the commit).
A wrong token gets 401 on every endpoint, as the Hub answers it.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import socket
import string
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import run_cli

from nrt_mlx.errors import NrtError
from nrt_mlx.export.hub import files_to_upload, hub_error, upload_folder_to_hub
from nrt_mlx.export.manifest import MANIFEST

REPO = "alice/tiny-nrt"


class FakeHub:
    """Records repos, commits and requests; accepts only ``Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.created: list[dict] = []
        self.files: dict[str, dict[str, bytes]] = {}  # repo -> path -> bytes
        self.requests: list[tuple[str, str, bool]] = []  # method, path, authorised
        self.unexpected: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _reply(
                self, status: int, body: dict, headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _serve(self) -> None:
                body = self._body()
                path = self.path.split("?")[0]
                authorised = self.headers.get("Authorization") == f"Bearer {hub.token}"
                hub.requests.append((self.command, path, authorised))
                if not authorised:
                    msg = "Invalid credentials in Authorization header"
                    return self._reply(401, {"error": msg}, {"X-Error-Message": msg})
                if self.command == "POST" and path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.created.append(payload)
                    repo = f"{payload['organization']}/{payload['name']}"
                    hub.files.setdefault(repo, {})
                    return self._reply(200, {"url": f"{hub.url}/{repo}"})
                if self.command == "POST" and path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/main", path)
                if self.command == "POST" and match and match.group(1) in hub.files:
                    repo, action = match.groups()
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        modes = [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                            for f in files
                        ]
                        return self._reply(200, {"files": modes})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            value = item["value"]
                            hub.files[repo][value["path"]] = base64.b64decode(value["content"])
                        elif item["key"] != "header":
                            hub.unexpected.append(f"commit line {item['key']}")
                    return self._reply(
                        200, {"commitUrl": f"{hub.url}/{repo}/commit/abc", "commitOid": "a" * 40}
                    )
                hub.unexpected.append(f"{self.command} {path}")
                return self._reply(404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"})

            do_GET = do_POST = do_PUT = _serve

        return Handler

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _private(created: dict) -> bool:
    """A repo-creation request asked for a private repo (huggingface-hub < 1.8 sends "private")."""
    return created.get("visibility") == "private" or created.get("private") is True


def secret_token() -> str:
    return "hf_" + "".join(secrets.choice(string.ascii_letters) for _ in range(34))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A running FakeHub with HF_ENDPOINT and HF_TOKEN pointing at it, and no saved login."""
    import huggingface_hub.constants as constants

    token = secret_token()
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with FakeHub(token) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", token)
        yield server


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A small model-like directory: binary weights, JSON, a card, a nested file, a .git folder."""
    folder = tmp_path / "fused"
    (folder / "extra").mkdir(parents=True)
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # never uploaded
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64 + secrets.token_bytes(999))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "README.md").write_text(
        "---\nlibrary_name: mlx\ntags:\n- mlx\n- nrt\n---\n\n# tiny\n"
    )
    (folder / "extra" / "notes.txt").write_text("nested files keep their path\n")
    return folder


def expected_files(folder: Path) -> dict[str, bytes]:
    """Every file of the folder but .git and nrt-mlx's own manifest, which stays local."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(folder).parts and p.name != MANIFEST
    }


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


# ---- tests ----------------------------------------------------------------------------------------


def test_upload_end_to_end_with_real_client(hub: FakeHub, model_dir: Path, capfd) -> None:
    from huggingface_hub.utils import logging as hf_logging

    records = _Records()
    loggers = [
        logging.getLogger(n) for n in ("", "huggingface_hub", "httpx2", "httpcore", "urllib3")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(records)
        lg.setLevel(logging.DEBUG)
    hf_logging.set_verbosity_debug()
    try:
        sent = upload_folder_to_hub(model_dir, REPO, private=True)
    finally:
        hf_logging.set_verbosity_warning()
        for lg, level in zip(loggers, levels):
            lg.removeHandler(records)
            lg.setLevel(level)

    want = expected_files(model_dir)
    assert sorted(sent) == sorted(want) == sorted(files_to_upload(model_dir))
    assert hub.files[REPO] == want  # every file, byte for byte, and nothing else (.git stays home)
    assert len(hub.created) == 1
    assert {"name": "tiny-nrt", "organization": "alice"}.items() <= hub.created[0].items()
    assert _private(hub.created[0])
    assert hub.requests and all(authorised for _, _, authorised in hub.requests)
    assert not hub.unexpected
    assert any("/commit/main" in line for line in records.lines), "debug logging was not captured"
    captured = capfd.readouterr()
    for text in (captured.out, captured.err, "\n".join(records.lines)):
        assert hub.token not in text


def test_cli_dry_run_lists_exactly_the_files(
    hub: FakeHub, model_dir: Path, monkeypatch, capsys
) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "upload", model_dir, REPO, "--dry-run")
    assert code == 0, err
    assert out.splitlines() == sorted(expected_files(model_dir))
    assert "nothing was sent" in err
    assert hub.requests == []


def test_cli_upload_sends_the_folder(hub: FakeHub, model_dir: Path, monkeypatch, capsys) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "upload", model_dir, REPO)
    assert code == 0, err
    assert out.splitlines() == sorted(expected_files(model_dir))
    assert hub.files[REPO] == expected_files(model_dir)
    assert not _private(hub.created[0])  # the Hub's default unless --private
    assert hub.token not in out + err


def test_cli_auth_error_is_one_line(hub: FakeHub, model_dir: Path, monkeypatch, capsys) -> None:
    wrong = secret_token()
    monkeypatch.setenv("HF_TOKEN", wrong)
    code, out, err = run_cli(monkeypatch, capsys, "upload", model_dir, REPO)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: upload to alice/tiny-nrt")
    assert "401" in err and "hf auth login" in err
    assert wrong not in err and "Traceback" not in err
    assert hub.files.get(REPO) is None


def test_name_login_and_network_errors(hub: FakeHub, model_dir: Path, monkeypatch) -> None:
    for bad in ("alice/bad--name", "a/b/c", "alice/"):
        with pytest.raises(NrtError, match="repo id"):
            upload_folder_to_hub(model_dir, bad)
    with pytest.raises(NrtError, match="no such directory"):
        upload_folder_to_hub(model_dir / "missing", REPO)

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(NrtError, match="not logged in"):
        upload_folder_to_hub(model_dir, REPO)

    monkeypatch.setenv("HF_TOKEN", hub.token)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    with pytest.raises(NrtError, match="could not reach") as err:
        upload_folder_to_hub(model_dir, REPO)
    assert "\n" not in str(err.value) and hub.token not in str(err.value)

    leaky = RuntimeError(f"server said: bad header Bearer {hub.token}\nsecond line")
    message = str(hub_error(leaky, REPO, hub.url, hub.token))
    assert hub.token not in message and "\n" not in message and "***" in message


def test_fuse_with_upload_repo(
    hub: FakeHub, tiny_run_factory, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "tiny-nrt"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "fuse", tiny_run_factory(), out, "--upload-repo", REPO, "--private"
    )
    assert code == 0, err
    assert hub.files[REPO] == expected_files(out)
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(
        hub.files[REPO]
    )
    assert f'load("{REPO}")' in hub.files[REPO]["README.md"].decode()
    assert _private(hub.created[0])
    assert hub.token not in stdout + err
