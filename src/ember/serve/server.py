"""`ember serve`: an OpenAI-compatible HTTP server and a chat page for a trained model.

    ember serve                                        # <run>/sft/final if present, else <run>/pretrain/final
    ember serve --checkpoint=out/model.gguf --port=8080 --api_key=sk-local
    ember serve --preset=stories260k                   # the tiny real model in ../shared/datasets (no training)
    ember serve --models=base=runs/a/pretrain/final,chat=runs/a/sft/final     # several, for the arena page

Then `openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")`, or open http://127.0.0.1:8000/
for the chat page. Binds to 127.0.0.1 unless --host says otherwise. Ctrl-C / SIGTERM shut down gracefully:
no new connections, requests in flight finish (up to shutdown_timeout_s), then the engines stop.
A service, not an artifact: it writes only the votes file (<run>/serve/votes.jsonl), never a meta.json.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ember.common.config import require
from ember.common.errors import UserError
from ember.common.log import print0


@dataclass
class Config:
    run: str = "runs/default"  # run folder: the default checkpoint, tokenizer and votes file live in it
    checkpoint: str = ""  # ember checkpoint folder, HF folder, .gguf or llama2.c .bin; "" = <run>/sft/final, else <run>/pretrain/final
    tokenizer: str = ""  # tokenizer.json or tok*.bin; "" = beside the checkpoint, else <run>/tokenizer/tokenizer.json
    name: str = ""  # model id in the API; "" = from the path (runs/demo/sft/final -> demo-sft)
    models: list[str] = field(default_factory=list)  # more models to serve side by side (picker, arena): name=path, ...
    host: str = "127.0.0.1"  # interface to bind; 0.0.0.0 exposes the server to the network (set an api_key)
    port: int = 8000  # TCP port; 0 = any free port (printed at start)
    api_key: str = ""  # require 'Authorization: Bearer <key>' on /v1 and /api; "" = open (or env EMBER_API_KEY)
    device: str = "auto"  # cpu, cuda, mps; auto = the best available
    threads: int = 0  # torch CPU threads; 0 = torch's default (1 is fastest for tiny models on a busy machine)
    n_slots: int = 8  # sequences decoded together per model (KV-cache slots; memory = slots x context)
    context: int = 0  # positions each slot holds (prompt + answer); 0 = the model's max_seq_len
    max_queue: int = 32  # requests waiting for a slot; beyond slots + queue the server answers 429
    max_prompt_tokens: int = 0  # longest prompt accepted; 0 = the model's context minus one
    max_tokens: int = 512  # largest max_tokens a request may ask for (and the chat default cap)
    max_choices: int = 8  # prompts x n per request
    max_body_bytes: int = 1_000_000  # larger request bodies get 413
    request_timeout_s: float = 120.0  # a request generating longer than this is ended (504 / SSE error)
    shutdown_timeout_s: float = 10.0  # on SIGTERM/Ctrl-C, wait this long for requests in flight
    votes: str = ""  # JSONL the chat page's votes append to; "" = <run>/serve/votes.jsonl
    web: bool = True  # serve the chat page at /
    log_level: str = "info"  # uvicorn's log level: debug, info, warning, error

    def __post_init__(self):
        require(0 <= self.port <= 65535, "port", self.port, "an int in [0, 65535]")
        for name in ("n_slots", "max_tokens", "max_choices", "max_body_bytes"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        require(min(self.max_queue, self.max_prompt_tokens, self.threads, self.context) >= 0,
                "max_queue/max_prompt_tokens/threads/context",
                (self.max_queue, self.max_prompt_tokens, self.threads, self.context), "ints >= 0")
        require(self.request_timeout_s > 0 and self.shutdown_timeout_s >= 0, "request_timeout_s/shutdown_timeout_s",
                (self.request_timeout_s, self.shutdown_timeout_s), "seconds, > 0 and >= 0")
        require(self.log_level in ("debug", "info", "warning", "error"), "log_level", self.log_level,
                "debug, info, warning or error")
        for m in self.models:
            require("=" in m and all(m.partition("=")[::2]), "models", m, "entries written name=path")


def _stories260k() -> Config:
    from ember.model.llama2c import stories260k_paths

    paths = stories260k_paths()
    if paths is None:
        raise UserError("the stories260k preset needs ../shared/datasets/models/stories260K (see its INVENTORY.md)")
    return Config(checkpoint=str(paths[0]), tokenizer=str(paths[1]), name="stories260K", threads=1)


PRESETS = {"stories260k": _stories260k}


def default_checkpoint(run: str) -> Path:
    """<run>/sft/final when fine-tuning finished, else <run>/pretrain/final."""
    sft = Path(run) / "sft" / "final"
    return sft if sft.exists() else Path(run) / "pretrain" / "final"


def load_models(cfg: Config):
    """The Served models of a config: the main checkpoint, then each name=path of cfg.models."""
    import torch

    from ember.common.dist import pick_device
    from ember.serve.models import load_served

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    ckpt = cfg.checkpoint or str(default_checkpoint(cfg.run))
    out = [load_served(ckpt, cfg.tokenizer, cfg.name, cfg.run, device)] if (cfg.checkpoint or not cfg.models) else []
    for entry in cfg.models:
        name, _, path = entry.partition("=")
        out.append(load_served(path, "", name, cfg.run, device))
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise UserError(f"two served models share a name ({names}): name them with --name= / --models=name=path")
    return out


def build_app(cfg: Config, models=None):
    from ember.serve.api import Limits, create_app

    models = models if models is not None else load_models(cfg)
    limits = Limits(n_slots=cfg.n_slots, context=cfg.context, max_queue=cfg.max_queue, max_prompt_tokens=cfg.max_prompt_tokens,
                    max_tokens=cfg.max_tokens, max_choices=cfg.max_choices, max_body_bytes=cfg.max_body_bytes,
                    request_timeout_s=cfg.request_timeout_s)
    votes = cfg.votes or str(Path(cfg.run) / "serve" / "votes.jsonl")
    return create_app(models, limits, api_key=cfg.api_key or os.environ.get("EMBER_API_KEY", ""),
                      votes_path=votes, web=cfg.web)


def main(cfg: Config) -> dict:
    import socket

    import uvicorn

    app = build_app(cfg)
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
        sock.listen(1024)  # connections made from now on wait in the backlog until uvicorn accepts them
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); pick another --port (0 = any free)") from None
    host, port = sock.getsockname()[:2]
    names = ", ".join(app.state.served)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not (cfg.api_key or os.environ.get("EMBER_API_KEY")):
        print0(f"[serve] warning: listening on {cfg.host} without an api_key: anyone who can reach it can use it")
    print0(f"[serve] {names} on http://{host}:{port}/v1 (chat page: http://{host}:{port}/)")
    server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, timeout_graceful_shutdown=cfg.shutdown_timeout_s,
                                           access_log=cfg.log_level == "debug"))
    server.run(sockets=[sock])
    print0("[serve] stopped")
    return {"models": list(app.state.served), "port": port}


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
