"""`ember serve` over HTTP on 127.0.0.1: the official openai client (completions, chat, streaming, usage),
request validation (always 4xx, never 5xx), API key, 429 on a full queue, timeouts, votes, graceful shutdown."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest

from ember.model.llama2c import stories260k_paths
from ember.serve.api import Limits, create_app
from ember.model.engine import Engine, SamplingParams


@pytest.fixture(scope="module")
def server(kit, real_or_tiny, tmp_path_factory):
    (model, tok), name = real_or_tiny
    votes = tmp_path_factory.mktemp("votes") / "votes.jsonl"
    app = create_app([kit.served(model, tok, name)], Limits(n_slots=4, max_tokens=64, max_prompt_tokens=100),
                     votes_path=votes)
    with kit.Server(app) as url:
        yield url, name, model, tok, votes


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_and_completions_match_the_engine(kit, server, client):
    url, name, model, tok, _ = server
    assert [m.id for m in client.models.list().data] == [name]
    assert client.models.retrieve(name).id == name
    prompt = "Once upon a time"
    r = client.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0)
    ids = kit.served(model, tok, name).encode_prompt(prompt)
    expected = Engine(model, tok, stop_ids=tok.stop_ids).generate([ids], SamplingParams(max_tokens=24, temperature=0))[0]
    assert r.choices[0].text == expected.text and r.choices[0].finish_reason == expected.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(expected.tokens))
    assert r.usage.total_tokens == len(ids) + len(expected.tokens) and r.object == "text_completion"


def test_streaming_equals_non_streaming_for_a_seed(server, client):
    _, name, *_ = server
    kw = dict(model=name, max_tokens=30, temperature=0.9, top_p=0.9, seed=7)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about a dog."}]
    full = client.chat.completions.create(messages=msgs, **kw)
    assert full.choices[0].message.role == "assistant" and full.object == "chat.completion"
    chunks = list(client.chat.completions.create(messages=msgs, stream=True, stream_options={"include_usage": True}, **kw))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1 and "".join(deltas) == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens and not chunks[-1].choices
    # completions stream too, and n > 1 gives distinct indexed choices (seed + i each)
    text = "".join(c.choices[0].text for c in client.completions.create(model=name, prompt="The", stream=True, max_tokens=20, seed=3))
    assert text == client.completions.create(model=name, prompt="The", max_tokens=20, seed=3).choices[0].text
    two = client.completions.create(model=name, prompt="The", max_tokens=20, seed=3, n=2, temperature=1.0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == text
    other = client.completions.create(model=name, prompt="The", max_tokens=20, seed=4, temperature=1.0)
    assert two.choices[1].text == other.choices[0].text != text  # choice i samples with seed + i


def test_stop_strings_over_http(server, client):
    _, name, *_ = server
    full = client.completions.create(model=name, prompt="Once upon a time", max_tokens=40, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    r = client.completions.create(model=name, prompt="Once upon a time", max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


BAD_REQUESTS = [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", b"[" * 200_000),  # nesting deep enough to exhaust the JSON parser's recursion
    ("/v1/completions", b"\xff\xfe\x00garbage"),
    ("/v1/completions", json.dumps([1, 2, 3]).encode()),
    ("/v1/completions", json.dumps({"prompt": "hi", "bogus_field": 1}).encode()),
    ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 10 ** 9}).encode()),
    ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": -1}).encode()),
    ("/v1/completions", json.dumps({"prompt": "hi", "temperature": "hot"}).encode()),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}'),
    ("/v1/completions", json.dumps({"prompt": "hi", "n": 1000}).encode()),
    ("/v1/completions", json.dumps({"prompt": "hi", "logprobs": 5}).encode()),
    ("/v1/completions", json.dumps({"prompt": "hi", "logprobs": 0}).encode()),  # 0 = the sampled token's: unsupported
    ("/v1/completions", json.dumps({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}).encode()),
    ("/v1/completions", json.dumps({"prompt": []}).encode()),
    ("/v1/completions", json.dumps({"prompt": [10 ** 7]}).encode()),
    ("/v1/completions", json.dumps({"prompt": "word " * 5000}).encode()),  # over max_prompt_tokens
    ("/v1/completions", json.dumps({"prompt": "x" * 600_000}).encode()),  # over the character cap
    ("/v1/chat/completions", json.dumps({"messages": []}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user"}]}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": "hello"}).encode()),
    ("/api/votes", json.dumps({"a": "x", "b": "y", "winner": "c", "prompt": "p"}).encode()),
]


@pytest.mark.parametrize("path,body", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_bad_requests_get_400_in_openai_shape(kit, server, path, body):
    status, data = kit.http("POST", server[0] + path, body, {"Content-Type": "application/json"}, timeout=20)
    assert status == 400, data
    assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["message"]


def test_other_client_errors(kit, server, client):
    url, name, *_ = server
    assert kit.http("POST", url + "/v1/completions", b"x" * 1_100_000, {"Content-Type": "application/json"})[0] == 413
    assert kit.http("GET", url + "/v1/nothing")[0] == 404
    assert kit.http("GET", url + "/v1/completions")[0] == 405
    assert kit.http("GET", url + "/web/../../../../etc/passwd")[0] == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="over this server's limit of 64"):
        client.completions.create(model=name, prompt="hi", max_tokens=65)


def test_context_length(kit, tiny):
    app = create_app([kit.served(*tiny, "tiny")], Limits(max_tokens=200))
    with kit.Server(app) as url:
        status, data = kit.http("POST", url + "/v1/completions", {"prompt": "hi " * 30, "max_tokens": 100})
        assert status == 400 and data["error"]["code"] == "context_length_exceeded"
        assert "maximum context length is 128" in data["error"]["message"]
        # chat without max_tokens: the answer may use the rest of the context
        status, data = kit.http("POST", url + "/v1/chat/completions",
                                {"messages": [{"role": "user", "content": "hi " * 30}], "ignore_eos": True})
        assert status == 200 and data["usage"]["total_tokens"] == 128
    # a chat prompt within max_prompt_tokens but over the context (--context=32): the same coded 400 that the
    # chat page trims its history on (it said "max_tokens = -15 is not allowed" with no code)
    app = create_app([kit.served(*tiny, "tiny")], Limits(context=32, max_prompt_tokens=60))
    with kit.Server(app) as url:
        status, data = kit.http("POST", url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 40}]})
        assert status == 400 and data["error"]["code"] == "context_length_exceeded", data


def test_votes_append_jsonl(kit, server):
    url, name, _, _, votes = server
    body = {"a": name, "b": name, "winner": "b", "prompt": "Which is better?", "answer_a": "x", "answer_b": "y",
            "seed_a": 1, "seed_b": 2, "temperature": 0.8}
    assert kit.http("POST", url + "/api/votes", body) == (200, {"ok": True})
    row = json.loads(votes.read_text().splitlines()[-1])
    assert {k: row[k] for k in body} == body and "time" in row
    status, data = kit.http("POST", url + "/api/votes", {**body, "b": "not-served"})
    assert status == 400 and "model 'not-served' is not served here" in data["error"]["message"]
    assert json.loads(votes.read_text().splitlines()[-1]) == row  # nothing written


def test_api_key(kit, tiny):
    app = create_app([kit.served(*tiny, "tiny")], api_key="sk-test")
    with kit.Server(app) as url:
        assert kit.http("GET", url + "/v1/models")[0] == 401
        assert kit.http("GET", url + "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert kit.http("GET", url + "/api/info")[1]["auth"] is True  # the page asks for a key only when needed
        good = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=30)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=3).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def test_full_queue_gets_429_and_disconnect_frees_the_slot(kit, tiny):
    model, tok = tiny
    app = create_app([kit.served(model, tok, "tiny")], Limits(n_slots=1, max_queue=0, max_tokens=120))
    with kit.Server(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        stream = c.completions.create(model="tiny", prompt="a", max_tokens=120, stream=True,
                                      extra_body={"ignore_eos": True})
        next(iter(stream))  # the first request holds the only slot
        status, data = kit.http("POST", url + "/v1/completions", {"prompt": "b", "max_tokens": 5})
        assert status == 429 and data["error"]["code"] == "queue_full"
        stream.close()  # client goes away: the engine cancels it and frees the slot
        deadline = time.monotonic() + 10
        while kit.http("GET", url + "/health")[1]["in_flight"]["tiny"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kit.http("POST", url + "/v1/completions", {"prompt": "b", "max_tokens": 5})[0] == 200


def test_a_plain_request_whose_client_left_frees_its_slot(kit, tiny, monkeypatch):
    """Not streamed: the server notices the closed connection while generating and cancels (it kept the slot
    until max_tokens before). Each decode step is slowed to 50 ms, so 120 tokens would take 6 s."""
    import socket

    model, tok = tiny
    head = model.head  # the engine's decode step ends in it
    monkeypatch.setattr(model, "head", lambda x: (time.sleep(0.05), head(x))[1])
    app = create_app([kit.served(model, tok, "tiny")], Limits(n_slots=1, max_queue=0, max_tokens=120))
    with kit.Server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"prompt": "a", "max_tokens": 120, "ignore_eos": True}).encode()
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            deadline = time.monotonic() + 5
            while not kit.http("GET", url + "/health")[1]["in_flight"]["tiny"] and time.monotonic() < deadline:
                time.sleep(0.02)
        t0 = time.monotonic()  # the client is gone
        while kit.http("GET", url + "/health")[1]["in_flight"]["tiny"] and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        assert time.monotonic() - t0 < 3, "the abandoned request kept its slot"


def test_request_timeout_is_504(kit, tiny):
    app = create_app([kit.served(*tiny, "tiny")], Limits(request_timeout_s=1e-6, max_tokens=100))
    with kit.Server(app) as url:
        status, data = kit.http("POST", url + "/v1/completions", {"prompt": "a", "max_tokens": 100, "ignore_eos": True})
        assert status == 504 and data["error"]["type"] == "timeout_error"


def test_ember_serve_process_shuts_down_gracefully(kit, tmp_path):
    """`ember serve` as a real process: a request in flight at SIGTERM still completes, then the process ends."""
    if stories260k_paths() is None:
        pytest.skip("../shared/datasets/models/stories260K is absent (see INVENTORY.md)")
    proc = subprocess.Popen([sys.executable, "-m", "ember.serve.server", "--preset=stories260k", "--port=0",
                             f"--run={tmp_path}", "--log_level=warning"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url, lines = None, []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
            url = m.group(1) if m else None
            assert line or proc.poll() is None, "".join(lines)
        assert url, "".join(lines)
        result = {}
        t = threading.Thread(target=lambda: result.update(r=kit.http("POST", url + "/v1/completions",
                             {"prompt": "Once", "max_tokens": 400, "ignore_eos": True}, timeout=60)))
        t.start()
        while not kit.http("GET", url + "/health")[1]["in_flight"]["stories260K"]:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert result["r"][0] == 200 and result["r"][1]["usage"]["completion_tokens"] == 400
        # uvicorn re-raises the signal once it has drained, so the exit status says "ended by SIGTERM"
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_empty_text_prompt_is_generation_from_bos(kit, server):
    """As OpenAI: prompt "" means "start from the beginning of a document"."""
    status, data = kit.http("POST", server[0] + "/v1/completions", {"prompt": "", "max_tokens": 5, "temperature": 0})
    assert status == 200 and data["usage"]["prompt_tokens"] == 1


def test_default_checkpoint_and_ember_chat_template(kit, tmp_path):
    """`ember serve` in a run folder: sft/final wins over pretrain/final; the run's tokenizer is found; chat
    requests are rendered with ember's template and stop at <|end|>."""
    import torch

    from ember.common.checkpoint import save_model
    from ember.model.gpt import GPTConfig, build_model
    from ember.serve.server import Config, build_app, load_models
    from ember.tokenizer.chat import render_chat
    from ember.tokenizer.train import save, train_tokenizer

    tok = train_tokenizer(["hello there, how are you? fine thanks. " * 4], 280, 1)
    save(tok, tmp_path / "tokenizer")
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=288, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, max_seq_len=64)
    save_model(tmp_path / "pretrain" / "final", build_model(cfg, "cpu"))
    assert [m.name for m in load_models(Config(run=str(tmp_path)))] == [f"{tmp_path.name}-pretrain"]
    save_model(tmp_path / "sft" / "final", build_model(cfg, "cpu"))
    (served,) = load_models(Config(run=str(tmp_path)))
    assert served.name == f"{tmp_path.name}-sft" and served.stop_ids == (tok.eos_id, tok.end_id)
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello there"}]
    assert served.render_chat(msgs) == render_chat(tok, msgs, add_generation_prompt=True)[0]
    with kit.Server(build_app(Config(run=str(tmp_path), max_tokens=8), [served])) as url:
        status, data = kit.http("POST", url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 8})
        assert status == 200 and data["model"] == served.name
        assert data["usage"]["prompt_tokens"] == len(served.render_chat(msgs))
