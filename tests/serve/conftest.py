"""Fixtures for the serving tests: the real stories260K model (skipped when absent) and a tiny random GPT
with a character tokenizer (always available). Torch runs single-threaded here: tiny decode steps are
latency-bound, and on a busy 2-core machine intra-op threads make them 100x slower, not faster."""

import json
import socket
import threading
import time
import types
import urllib.error
import urllib.request

import pytest
import torch

from ember.model.gpt import GPTConfig, build_model
from ember.tokenizer.special import load_tokenizer
from ember.model.llama2c import load_llama2c, stories260k_paths


class CharTokenizer:
    """ids 0 (BOS) and 1 (EOS), then one id per character of ALPHABET."""

    ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?\n"
    bos_id, eos_id = 0, 1
    vocab_size = 2 + len(ALPHABET)
    stop_ids = (1,)

    def encode(self, text: str) -> list[int]:
        return [2 + self.ALPHABET.index(c) for c in text.lower() if c in self.ALPHABET]

    def encode_prompt(self, text: str) -> list[int]:
        return [self.bos_id] + self.encode(text)

    def render_chat(self, messages, add_generation_prompt=False, where="messages"):
        """A base model's rendering (no template): BOS + the contents joined by blank lines."""
        ids = self.encode_prompt("\n\n".join(m["content"] for m in messages))
        return ids, [0] * len(ids)

    def decode(self, ids) -> str:
        return "".join(self.ALPHABET[i - 2] for i in ids if i >= 2)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): a random 2-layer GQA model, deterministic weights."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=CharTokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                    max_seq_len=128)
    model = build_model(cfg, "cpu").eval()
    with torch.no_grad():  # larger logits than init's N(0, 0.02) so sampling is far from uniform
        model.lm_head.weight.mul_(50)
    return model, CharTokenizer()


@pytest.fixture(scope="session")
def stories():
    """(model, tokenizer) of the real pretrained stories260K (llama2.c), or skip."""
    paths = stories260k_paths()
    if paths is None:
        pytest.skip("../shared/datasets/models/stories260K is absent (see INVENTORY.md)")
    model = load_llama2c(paths[0])
    return model, load_tokenizer(paths[1], model.config.vocab_size)


@pytest.fixture(params=["tiny", "stories"])
def any_model(request):
    return request.getfixturevalue(request.param)


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
    return types.SimpleNamespace(http=http, Server=ServerThread, served=served_model, CharTokenizer=CharTokenizer)
