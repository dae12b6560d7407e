"""The security posture of the running app, probed over raw HTTP (httpx) on loopback.

Files: no route serves anything but the app's own temporary files (not /etc/passwd, not the project,
not a .env in the working folder, not the model cache or a checkpoint folder, not through ``..`` in any
encoding) and the server fetches no remote URL for anyone. The queue cannot be bypassed, uploads are
capped, errors are curated, monitoring, MCP, SSR and analytics are off, authentication works when
configured, and uploads are deleted after the configured time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from http.client import HTTPConnection
from pathlib import Path

import httpx
import pytest
from _server import ROOT, RunningApp, fake_hub_cache, running_app
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

EXAMPLE = ROOT / "assets" / "examples" / "chelsea.jpg"
SECRET = "blip-app-secret-6f1c"  # written into every file a probe must not reach


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: dict[str, Path]) -> dict[str, Path]:
    """Files the server must never serve: a .env in its working folder, a model cache, a checkpoint."""
    work = tmp_path_factory.mktemp("workdir")
    (work / ".env").write_text(f"HF_TOKEN={SECRET}\n")
    cache = fake_hub_cache(tmp_path_factory.mktemp("hub"), {"Salesforce/blip2-opt-2.7b": tiny_checkpoints["blip2-opt"]})
    snapshot = next(cache.glob("models--Salesforce--blip2-opt-2.7b/snapshots/*"))
    (snapshot / "secret.txt").write_text(SECRET)
    checkpoint = tmp_path_factory.mktemp("checkpoint") / "instructblip-flan-t5"
    shutil.copytree(tiny_checkpoints["instructblip-flan-t5"], checkpoint)
    (checkpoint / "secret.txt").write_text(SECRET)
    return {"workdir": work, "env": work / ".env", "cache": cache, "cached": snapshot / "secret.txt",
            "checkpoint": checkpoint / "secret.txt", "config": checkpoint / "config.json"}


@pytest.fixture(scope="module")
def app(secrets: dict[str, Path]):
    previous = os.getcwd()
    os.chdir(secrets["workdir"])  # the .env sits in the server's working folder
    try:
        with running_app(["blip2-opt-2.7b", str(secrets["checkpoint"].parent)], "--max-upload-mb", "1",
                         cache_dir=secrets["cache"]) as running:
            yield running
    finally:
        os.chdir(previous)


@pytest.fixture(scope="module")
def http(app: RunningApp):
    with httpx.Client(base_url=app.url, timeout=30) as client:
        yield client


def _uploaded(http: httpx.Client, data: bytes, name: str = "cat.jpg") -> str:
    response = http.post("/gradio_api/upload", files={"files": (name, data, "image/jpeg")})
    assert response.status_code == 200, response.text
    return response.json()[0]


def raw_get(base_url: str, path: str) -> tuple[int, str]:
    """GET ``path`` exactly as written: http.client sends it as is (httpx would resolve the ``..``)."""
    host, port = base_url.split("//")[1].rstrip("/").split(":")
    connection = HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def _refused(http: httpx.Client, path: str) -> None:
    status, text = raw_get(str(http.base_url), path)
    assert status in (400, 403, 404, 405, 422), (path, status)
    assert SECRET not in text and "root:" not in text, path


def test_gradio_is_at_least_the_security_floor() -> None:
    import gradio

    major, minor = (int(part) for part in gradio.__version__.split(".")[:2])
    assert (major, minor) >= (6, 20), gradio.__version__


def test_the_apps_own_uploads_are_served(http: httpx.Client) -> None:
    path = Path(_uploaded(http, EXAMPLE.read_bytes()))
    response = http.get(f"/gradio_api/file={path}")
    assert response.status_code == 200 and response.content == EXAMPLE.read_bytes()
    # the probes below really send their ".." to the server: one that stays inside the uploads is served
    status, _ = raw_get(str(http.base_url), f"/gradio_api/file={path.parent}/../{path.parent.name}/{path.name}")
    assert status == 200


def test_no_file_route_serves_anything_else(http: httpx.Client, secrets: dict[str, Path], app: RunningApp) -> None:
    upload = Path(_uploaded(http, EXAMPLE.read_bytes()))
    targets = [
        "/etc/passwd",
        str(ROOT / "app.py"),
        str(ROOT / "blip_app" / "config.py"),
        str(secrets["env"]),
        ".env",  # relative to the server's working folder
        str(secrets["cached"]),
        str(secrets["checkpoint"]),
        str(secrets["config"]),
        f"{upload.parent}/../../../etc/passwd",
        f"{upload.parent}/..%2f..%2f..%2fetc%2fpasswd",
        f"{upload.parent}/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        f"{upload.parent}/%252e%252e/%252e%252e/%252e%252e/etc/passwd",
        f"{upload.parent}/../../..{secrets['env']}",
    ]
    for target in targets:
        for route in ("/gradio_api/file=", "/gradio_api/file/"):
            _refused(http, route + target)
    for route in ("/static/", "/assets/", "/svelte/", "/gradio_api/static/"):
        for traversal in ("../../../../../../etc/passwd", "..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
                          "%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                          f"../../../../../../..{secrets['env']}"):
            _refused(http, route + traversal)
    _refused(http, "/gradio_api/run-history/records/x/y/assets/z")  # run history is off


def test_the_server_fetches_no_remote_url(http: httpx.Client, app: RunningApp) -> None:
    for url in ("http://example.com/a.png", "https://huggingface.co/favicon.ico", f"{app.url}config",
                "HTTP://example.com/x", "file:///etc/passwd"):
        for route in ("/gradio_api/file=", "/gradio_api/file/"):
            response = http.get(route + url)
            assert response.status_code == 403, (route + url, response.status_code)
    assert "serves only its own files" in http.get("/gradio_api/file=http://example.com/a.png").text
    assert http.get("/gradio_api/proxy=http://example.com/a.png").status_code in (400, 403, 404)


def test_the_remote_file_guard_never_calls_gradio() -> None:
    """The middleware on its own: a public URL never reaches the app behind it (no network needed)."""
    import asyncio

    from blip_app.web.server import _Guard

    reached, sent = [], []

    async def downstream(scope, receive, send):
        reached.append(scope["path"])

    async def send(message):
        sent.append(message)

    guard = _Guard(downstream)
    for path in ("/gradio_api/file=https://8.8.8.8/x.png", "/gradio_api/file/http://example.com/a",
                 "/gradio_api/file= http://example.com/a", "/prefix/gradio_api/file=Https://x"):
        sent.clear()
        asyncio.run(guard({"type": "http", "path": path}, None, send))
        assert sent[0]["status"] == 403
    assert reached == []
    for path in ("/gradio_api/file=/tmp/gradio/abc/photo 12:30.png", "/gradio_api/upload", "/config"):
        asyncio.run(guard({"type": "http", "path": path}, None, send))
    assert len(reached) == 3


def test_the_queue_cannot_be_bypassed(http: httpx.Client) -> None:
    for name in ("caption", "answer", "chat", "models"):
        for route in (f"/gradio_api/run/{name}", f"/gradio_api/api/{name}"):
            response = http.post(route, json={"data": []})
            assert response.status_code == 404, (route, response.status_code)
            assert "does not accept direct HTTP POST requests" in response.text


def test_an_upload_over_the_limit_gets_413(http: httpx.Client) -> None:
    response = http.post("/gradio_api/upload", files={"files": ("big.jpg", os.urandom(2 * 1024 * 1024), "image/jpeg")})
    assert response.status_code == 413
    assert _uploaded(http, os.urandom(512 * 1024))  # under the limit


def test_an_unexpected_exception_reaches_the_client_as_the_curated_sentence(app: RunningApp, http: httpx.Client,
                                                                          monkeypatch) -> None:
    from blip_app.errors import GENERIC_MESSAGE

    def broken(*args, **kwargs):
        raise RuntimeError(f"internal detail {SECRET} at /srv/app/secret.py line 3")

    monkeypatch.setattr(app.service, "run", broken)
    client = Client(app.url, verbose=False, download_files=False)
    with pytest.raises(AppError) as caught:
        client.predict(handle_file(str(EXAMPLE)), "blip2-opt-2.7b", "fast", api_name="/caption")
    assert str(caught.value) == GENERIC_MESSAGE
    # the same over raw HTTP: the event stream carries the sentence and nothing else
    file = {"path": _uploaded(http, EXAMPLE.read_bytes()), "meta": {"_type": "gradio.FileData"}}
    data = [file, "blip2-opt-2.7b", "fast", None, None, None, None, None, None, None, None, False]
    event = http.post("/gradio_api/call/caption", json={"data": data}).json()["event_id"]
    stream = http.get(f"/gradio_api/call/caption/{event}").text
    assert GENERIC_MESSAGE in stream and SECRET not in stream and "Traceback" not in stream
    # an error raised by gradio itself, before the app's function (malformed input): no detail either
    event = http.post("/gradio_api/call/caption", json={"data": [{"path": 5}]}).json()["event_id"]
    stream = http.get(f"/gradio_api/call/caption/{event}").text
    assert "event: error" in stream and "Traceback" not in stream and "File \\" not in stream
    client.close()


def test_monitoring_mcp_and_ssr_are_off(app: RunningApp, http: httpx.Client) -> None:
    assert http.get("/monitoring").status_code == 403
    assert http.get("/monitoring/summary").status_code == 403
    for path in ("/gradio_api/mcp/sse", "/gradio_api/mcp/", "/gradio_api/mcp/schema"):
        assert http.get(path).status_code == 404, path
    assert app.demo.ssr_mode is False and not app.demo.mcp_server
    assert app.demo.show_error is False and app.demo.enable_monitoring is False
    assert app.demo.analytics_enabled is False
    assert not app.demo.api_open  # queue(api_open=False)
    assert app.demo.max_file_size == 1024 * 1024


def test_analytics_are_off_when_launched_through_app_py() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"}
    code = ("import os, app; from blip_app.web import server; import gradio.analytics as analytics; "
            "print(os.environ['GRADIO_ANALYTICS_ENABLED'], analytics.analytics_enabled())")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["False", "False"]


def test_authentication_when_configured(tiny_checkpoints: dict[str, Path]) -> None:
    model = str(tiny_checkpoints["blip2-opt"])
    with running_app([model], "--auth", "alice:s3cret-pass") as running:
        with httpx.Client(base_url=running.url, timeout=30) as anonymous:
            assert anonymous.get("/config").status_code == 401
            assert anonymous.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0,
                                                                  "session_hash": "x"}).status_code == 401
            assert anonymous.post("/gradio_api/call/models", json={"data": []}).status_code == 401
            assert anonymous.post("/gradio_api/upload", files={"files": ("a.jpg", b"x", "image/jpeg")}).status_code \
                == 401
            wrong = anonymous.post("/login", data={"username": "alice", "password": "nope"})
            assert wrong.status_code in (400, 401)
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own kinds
            Client(running.url, verbose=False)
        client = Client(running.url, auth=("alice", "s3cret-pass"), verbose=False)
        assert [entry["name"] for entry in client.predict(api_name="/models")][0] == model
        assert isinstance(client.predict(handle_file(str(EXAMPLE)), model, "fast", max_new_tokens=3,
                                         api_name="/caption"), str)
        client.close()


def test_uploads_are_deleted_after_the_configured_time(tiny_checkpoints: dict[str, Path]) -> None:
    with running_app([str(tiny_checkpoints["blip2-opt"])], "--delete-uploads-after", "2") as running:
        with httpx.Client(base_url=running.url, timeout=30) as http:
            path = Path(_uploaded(http, EXAMPLE.read_bytes(), name="to-be-deleted.jpg"))
            assert path.exists() and http.get(f"/gradio_api/file={path}").status_code == 200
            deadline = time.monotonic() + 15
            while path.exists() and time.monotonic() < deadline:
                time.sleep(0.25)
            assert not path.exists(), "the upload was still there 15 s later"
            assert http.get(f"/gradio_api/file={path}").status_code in (403, 404)
