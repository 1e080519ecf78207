"""The OpenAI-compatible HTTP API (FastAPI) over one Engine per served model, plus the chat page and votes.

    GET  /v1/models                  the served models
    POST /v1/completions             text completion (prompt: str | [str] | [int] | [[int]]), SSE with stream=true
    POST /v1/chat/completions        chat with the model's chat template, SSE with stream=true
    POST /api/votes                  the chat page's "which answer is better?" -> one JSONL line (eval/arena reads it)
    GET  /  /web/*  /api/info  /health

Every user mistake is a 4xx in OpenAI's error shape {"error": {"message", "type", "param", "code"}}: unknown
fields, values out of range, OpenAI features we do not implement (logprobs, tools, ...), prompts over the
limits, oversized or malformed (even deeply nested) JSON bodies, a full queue (429). Sampling extensions
under vLLM's names: top_k, min_p, repetition_penalty, ignore_eos.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException

from ember.common.errors import UserError
from ember.model.engine import Engine, QueueFull, SamplingParams
from ember.serve.models import Served

WEB_DIR = Path(__file__).parent / "web"
# OpenAI request fields we accept but do not implement: a non-default value is a 400 naming the field
UNSUPPORTED = {"logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice", "functions", "function_call",
               "response_format", "suffix", "echo", "best_of", "parallel_tool_calls", "audio", "modalities",
               "prediction", "web_search_options", "reasoning_effort"}
UNSUPPORTED_DEFAULTS = {"best_of": 1, "response_format": {"type": "text"}, "tool_choice": "none", "top_logprobs": 0}
IGNORED = {"user", "store", "metadata", "service_tier"}  # bookkeeping fields with no effect on the answer


@dataclasses.dataclass
class Limits:
    n_slots: int = 8  # sequences decoded together (KV-cache slots)
    context: int = 0  # positions each slot holds (prompt + answer); 0 = the model's max_seq_len
    max_queue: int = 32  # requests waiting for a slot; more in flight -> 429
    max_prompt_tokens: int = 0  # 0 = the model's context minus one
    max_tokens: int = 512  # largest max_tokens a request may ask for
    max_choices: int = 8  # prompts x n in one request
    max_body_bytes: int = 1_000_000  # larger request bodies -> 413
    request_timeout_s: float = 120.0  # a request still generating after this is ended (504, or an SSE error)


# ---------------------------------------------------------------------------- request schemas

class _Strict(BaseModel):
    # strict: no coercion ("1" -> 1, true -> 1), so whatever the schema rejects, the server rejects too
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class _OpenAIRequest(_Strict):
    model: str | None = Field(None, max_length=256)  # None = the first served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    top_k: int = Field(0, ge=0, le=1_000_000)  # extensions (vLLM's names)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _known_openai_fields(cls, data):
        if not isinstance(data, dict):
            return data
        out = {}
        for k, v in data.items():
            if k in UNSUPPORTED:
                # 0 is a value, not "unset" (0 == False in Python): logprobs=0 asks for the sampled token's
                unset = v is None or v is False or (isinstance(v, (str, list, dict)) and not v)
                if not unset and v != UNSUPPORTED_DEFAULTS.get(k):
                    raise ValueError(f"'{k}' is not supported by ember serve; leave it out")
            elif k not in IGNORED:
                out[k] = v
        return out

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not 1 <= len(s) <= 256 for s in stops):
            raise ValueError("stop takes up to 4 strings of 1 to 256 characters")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v):
        if v is not None and (set(v) - {"include_usage", "continuous_usage_stats"} or
                              not all(isinstance(x, bool) for x in v.values())):
            raise ValueError("stream_options takes only boolean include_usage")
        return v


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(..., description="text, texts, token ids or lists of them")


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # name, refusal, ... carry nothing we use
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class ChatRequest(_OpenAIRequest):
    messages: list[Message] = Field(..., min_length=1, max_length=512)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


class Vote(_Strict):
    a: str = Field(..., max_length=256)  # model of answer A
    b: str = Field(..., max_length=256)
    winner: Literal["a", "b", "tie", "both_bad"]
    prompt: str = Field(..., max_length=200_000)
    answer_a: str = Field("", max_length=200_000)
    answer_b: str = Field("", max_length=200_000)
    seed_a: int | None = None
    seed_b: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)


# ---------------------------------------------------------------------------- errors

class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


ERROR_RESPONSES = {s: {"description": d, "content": {"application/json": {"schema": {"type": "object"}}}}
                   for s, d in [(400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
                                (413, "body too large"), (429, "queue full"), (504, "generation timed out")]}


class BodyGuard:
    """ASGI middleware: POST bodies over max_bytes -> 413, bodies that are not parseable JSON (including nesting
    deep enough to exhaust the parser's recursion) -> 400, before FastAPI parses them again."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.max_bytes:
                return await _send_json(send, 413, error_body(f"request body over {self.max_bytes} bytes"))
        body = b"".join(chunks)
        try:
            json.loads(body)
        except (ValueError, RecursionError) as e:
            return await _send_json(send, 400, error_body(f"request body is not valid JSON: {str(e)[:200]}"))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as streaming responses expect

        await self.app(scope, replay, send)


async def client_gone(http: HTTPRequest) -> bool:
    """Has the client closed the connection? Once the body is read the next ASGI message is the disconnect, so
    wait a moment for one. (Starlette's is_disconnected() missed it here: the message arrives inside the
    cancelled scope it polls with.)"""
    try:
        return (await asyncio.wait_for(http.receive(), timeout=0.01))["type"] == "http.disconnect"
    except asyncio.TimeoutError:
        return False


async def _send_json(send, status: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------------------- the app

def create_app(models: list[Served], limits: Limits | None = None, *, api_key: str = "",
               votes_path: str | Path | None = None, web: bool = True) -> FastAPI:
    """The ASGI app; its lifespan starts one engine thread per model and stops them (draining) at shutdown."""
    limits = limits or Limits()
    if not models:
        raise UserError("nothing to serve: give at least one model")
    engines = {m.name: Engine(m.model, m.tokenizer, n_slots=limits.n_slots, max_len=limits.context or None,
                              max_queue=limits.max_queue, stop_ids=m.stop_ids) for m in models}
    served = {m.name: m for m in models}
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for e in engines.values():
            e.start()
        yield
        # uvicorn has already drained (or dropped) the connections, so what is left in the engines is cancelled soon
        await asyncio.gather(*(asyncio.to_thread(e.stop, 5.0) for e in engines.values()))

    app = FastAPI(title="ember serve", version="1", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat over ember models.")
    app.state.engines, app.state.served, app.state.limits = engines, served, limits
    app.add_middleware(BodyGuard, max_bytes=limits.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        msg = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}"
        return JSONResponse(error_body(msg[:500], param=".".join(loc) or None), 400)

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), e.status_code, headers=e.headers)

    @app.exception_handler(UserError)
    async def _user(request, e: UserError):
        return JSONResponse(error_body(str(e)), 400)

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key and request.url.path.startswith(("/v1/", "/api/")) and request.url.path != "/api/info":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(error_body("missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                               code="invalid_api_key"), 401)
        return await call_next(request)

    def engine_for(name: str | None) -> tuple[Served, Engine]:
        name = name or next(iter(served))
        if name not in served:
            raise APIError(404, f"the model '{name}' is not served here; GET /v1/models lists them",
                           param="model", code="model_not_found")
        return served[name], engines[name]

    def model_card(name: str) -> dict:
        m = served[name]
        return {"id": name, "object": "model", "created": created, "owned_by": "ember",
                "context_length": engines[name].max_len, "vocab_size": m.model.config.vocab_size}

    @app.get("/v1/models", responses={401: ERROR_RESPONSES[401]})
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in served]}

    @app.get("/v1/models/{model_id}", responses={k: ERROR_RESPONSES[k] for k in (401, 404)})
    async def get_model(model_id: str):
        engine_for(model_id)
        return model_card(model_id)

    def sampling(req: _OpenAIRequest, engine: Engine, n_prompt: int, max_tokens: int | None, i: int) -> SamplingParams:
        ctx_left = engine.max_len - n_prompt
        if max_tokens is None:  # chat default: as long as the context and the server's limit allow
            max_tokens = min(limits.max_tokens, ctx_left)
        if max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens = {max_tokens} is over this server's limit of {limits.max_tokens}",
                           param="max_tokens")
        if max_tokens > ctx_left:
            raise APIError(400, f"this model's maximum context length is {engine.max_len} tokens; the request has "
                           f"{n_prompt} prompt tokens + max_tokens {max_tokens}. Shorten the prompt or lower "
                           f"max_tokens.", param="max_tokens", code="context_length_exceeded")
        seed = None if req.seed is None else (req.seed + i) % 2 ** 63
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                              min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                              presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                              stop=tuple(req.stop or ()), ignore_eos=req.ignore_eos, seed=seed,
                              timeout_s=limits.request_timeout_s)

    def check_prompt(ids: list[int], m: Served, engine: Engine, param: str) -> list[int]:
        limit = min(limits.max_prompt_tokens or engine.max_len, engine.max_len - 1)  # room for one answer token
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) > limit:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {limit}",
                           param=param, code="context_length_exceeded")
        if any(not 0 <= t < m.model.config.vocab_size for t in ids):
            raise APIError(400, f"token ids must be in [0, {m.model.config.vocab_size})", param=param)
        return ids

    def text_cap(text: str, param: str) -> str:
        cap = 16 * (limits.max_prompt_tokens or 4096)  # cheap bound before tokenizing: tokens are rarely > 16 chars
        if len(text) > cap:
            raise APIError(400, f"the prompt has {len(text)} characters; the limit is {cap}", param=param)
        return text

    def submit(engine: Engine, jobs: list[tuple[list[int], SamplingParams]], on_event) -> list:
        reqs = []
        try:
            for ids, params in jobs:
                reqs.append(engine.submit(ids, params, on_event=on_event))
        except QueueFull as e:
            for r in reqs:
                r.cancel()
            raise APIError(429, f"server busy ({e}); retry shortly", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        return reqs

    async def run(http: HTTPRequest, engine: Engine, jobs, prompt_tokens: int, stream: bool, make_chunk, make_final,
                  include_usage: bool):
        """Submit the jobs ((ids, params) per choice) and answer with one JSON body or an SSE stream. A client
        that goes away frees its slots: the stream notices at its next write, a plain request within 0.5 s."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        # the finish reason is read in the engine thread when the event is made: only the last event has one
        reqs = submit(engine, jobs, lambda r, delta: loop.call_soon_threadsafe(q.put_nowait, (r, delta, r.finish_reason)))
        index = {id(r): i for i, r in enumerate(reqs)}

        def usage():
            done = sum(len(r.tokens) for r in reqs)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

        if not stream:
            finished = 0
            try:
                check_at = loop.time() + 0.5  # tokens arrive far more often than this: poll the client on a clock
                while finished < len(reqs):
                    try:
                        _, _, reason = await asyncio.wait_for(q.get(), timeout=max(0.0, check_at - loop.time()))
                        finished += reason is not None
                    except asyncio.TimeoutError:
                        pass
                    if loop.time() >= check_at:
                        if await client_gone(http):
                            return JSONResponse({}, status_code=499)  # nobody reads it; finally cancels the work
                        check_at = loop.time() + 0.5
            finally:
                for r in reqs:
                    r.cancel()
            if any(r.finish_reason == "timeout" for r in reqs):
                raise APIError(504, f"generation took longer than {limits.request_timeout_s} s", "timeout_error")
            if any(r.finish_reason == "error" for r in reqs):
                raise APIError(500, "generation failed: " + next(r.error for r in reqs if r.error), "server_error")
            return make_final(reqs, usage())

        async def events():
            try:
                for i in range(len(reqs)):
                    first = make_chunk(i, None, None, first=True)
                    if first:
                        yield f"data: {json.dumps(first)}\n\n"
                finished = 0
                while finished < len(reqs):
                    r, delta, reason = await q.get()
                    if reason in ("timeout", "error", "cancelled"):
                        kind = "timeout_error" if reason == "timeout" else "server_error"
                        yield f"data: {json.dumps(error_body(f'generation ended: {reason}', kind))}\n\n"
                        break
                    if delta or reason:
                        yield f"data: {json.dumps(make_chunk(index[id(r)], delta, reason))}\n\n"
                    finished += reason is not None
                if include_usage:
                    yield f"data: {json.dumps(make_chunk(None, None, None, usage=usage()))}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also on client disconnect (the generator is cancelled): free the slots
                for r in reqs:
                    r.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    responses = {k: ERROR_RESPONSES[k] for k in (400, 401, 404, 413, 429, 504)}

    @app.post("/v1/completions", responses=responses)
    async def completions(req: CompletionRequest, http: HTTPRequest):
        m, engine = engine_for(req.model)
        p = req.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
            p = [p]
        if not p:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(p) * req.n > limits.max_choices:
            raise APIError(400, f"{len(p)} prompts x n = {req.n} is over the limit of {limits.max_choices} choices", param="n")
        prompts = [check_prompt(m.encode_prompt(text_cap(x, "prompt")) if isinstance(x, str) else list(x), m, engine, "prompt")
                   for x in p]
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default for completions
        jobs = [(ids, sampling(req, engine, len(ids), max_tokens, i)) for ids in prompts for i in range(req.n)]
        cid, name = f"cmpl-{uuid.uuid4().hex}", m.name
        head = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": name}

        def chunk(i, delta, reason, first=False, usage=None):
            if first:
                return None
            if usage is not None:
                return {**head, "choices": [], "usage": usage}
            return {**head, "choices": [{"index": i, "text": delta or "", "logprobs": None, "finish_reason": reason}]}

        def final(reqs, usage):
            return {**head, "choices": [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                                        for i, r in enumerate(reqs)], "usage": usage}

        return await run(http, engine, jobs, sum(map(len, prompts)), req.stream, chunk, final,
                         bool((req.stream_options or {}).get("include_usage")))

    @app.post("/v1/chat/completions", responses=responses)
    async def chat_completions(req: ChatRequest, http: HTTPRequest):
        m, engine = engine_for(req.model)
        if req.n > limits.max_choices:
            raise APIError(400, f"n = {req.n} is over the limit of {limits.max_choices}", param="n")
        messages = []
        for msg in req.messages:
            content = msg.content if isinstance(msg.content, str) else "".join(part.text for part in msg.content)
            messages.append({"role": "system" if msg.role == "developer" else msg.role, "content": content})
        text_cap("".join(x["content"] for x in messages), "messages")
        ids = check_prompt(m.render_chat(messages), m, engine, "messages")
        max_tokens = req.max_completion_tokens or req.max_tokens
        jobs = [(ids, sampling(req, engine, len(ids), max_tokens, i)) for i in range(req.n)]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": m.name, "system_fingerprint": None}

        def chunk(i, delta, reason, first=False, usage=None):
            if usage is not None:
                return {**head, "choices": [], "usage": usage}
            d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
            return {**head, "choices": [{"index": i, "delta": d, "logprobs": None, "finish_reason": reason}]}

        def final(reqs, usage):
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                        "finish_reason": r.finish_reason} for i, r in enumerate(reqs)]
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage}

        return await run(http, engine, jobs, len(ids), req.stream, chunk, final,
                         bool((req.stream_options or {}).get("include_usage")))

    @app.post("/api/votes", responses={k: ERROR_RESPONSES[k] for k in (400, 401, 413)})
    async def vote(v: Vote):
        if votes_path is None:
            raise APIError(400, "this server records no votes (started without a votes file)")
        for side, name in (("a", v.a), ("b", v.b)):  # a vote between models this server never ran is noise
            if name not in served:
                raise APIError(400, f"vote '{side}': model '{name[:80]}' is not served here ({', '.join(served)})")
        row = {**v.model_dump(), "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        path = Path(votes_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:  # one write of one line: appends do not interleave
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return {"ok": True}

    @app.get("/api/info")
    async def info():
        return {"models": list(served), "max_tokens": limits.max_tokens, "auth": bool(api_key),
                "votes": votes_path is not None}

    @app.get("/health")
    async def health():
        return {"status": "ok", "in_flight": {n: e.in_flight() for n, e in engines.items()}}

    if web:
        app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

        @app.get("/", include_in_schema=False)
        async def index():
            return FileResponse(WEB_DIR / "index.html")

    return app
