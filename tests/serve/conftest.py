"""Fixtures for the serving tests: a uvicorn server thread on 127.0.0.1 and an HTTP helper (the models, `tiny`,
`stories` and `any_model`, come from tests/conftest.py)."""

import json
import socket
import threading
import time
import types
import urllib.error
import urllib.request

import pytest



class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a thread; `with ServerThread(app) as url:`."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive(), "server did not shut down"


def http(method: str, url: str, body=None, headers: dict | None = None, timeout: float = 30):
    """(status, parsed JSON or raw bytes) with the standard library; 4xx/5xx are returned, not raised."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, data = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, data = e.code, e.read()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data


def served_model(model, tok, name):
    from ember.serve.models import Served

    return Served(name, model, tok, name)


@pytest.fixture(scope="session")
def real_or_tiny(request):
    """stories260K when present (a real model makes real text), else the tiny random model."""
    try:
        return request.getfixturevalue("stories"), "stories260K"
    except pytest.skip.Exception:
        return request.getfixturevalue("tiny"), "tiny"


@pytest.fixture(scope="session")
def kit():
    """The helpers above for test modules (with --import-mode=importlib a conftest is not importable)."""
    return types.SimpleNamespace(http=http, Server=ServerThread, served=served_model)
