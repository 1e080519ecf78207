"""Calibration and held-out token windows for compression, from the run's own tokens or any text.

    calib, heldout = windows("runs/demo/tokenize/tokens", tok, n_calib=64, n_eval=16, seq_len=256)
    calib, heldout = windows("../shared/datasets/wikitext2/valid.txt", tok, 64, 16, 256)
    calib, heldout = windows("stdlib", tok, 64, 16, 256)      # the pydoc topics of the running Python

A token folder (`ember tokenize`'s, checked against the model's tokenizer) gives calibration windows from its
train split and held-out ones from val (train's tail when there is no val split). A text file (.txt, .md,
.py, or .jsonl/.json with a "text" field per record) is encoded with the model's tokenizer and cut into
windows of seq_len tokens; the last n_eval windows are held out and calibration is drawn from the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ember.common.errors import UserError


def _text_of(path: Path) -> str:
    if path.suffix in (".jsonl", ".json"):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        try:
            recs = [json.loads(line) for line in lines if line.strip()] if path.suffix == ".jsonl" else \
                json.loads("\n".join(lines))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e}); pass a text file or JSON records with a 'text' field") from None
        texts = [r.get("text") for r in recs if isinstance(r, dict) and isinstance(r.get("text"), str)]
        if not texts:
            raise UserError(f"{path}: no record with a string 'text' field; pass a plain text file or such records")
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8", errors="replace")


def stdlib_text() -> str:
    """Real English text on every machine that runs ember: the pydoc help topics of this Python."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def text_windows(text: str, tok, seq_len: int) -> torch.Tensor:
    """(n, seq_len) int64: the text encoded once and cut into consecutive windows (the tail dropped)."""
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    n = len(ids) // seq_len
    return torch.from_numpy(ids[: n * seq_len].reshape(n, seq_len).copy())


def windows(source: str | Path, tok, n_calib: int, n_eval: int, seq_len: int, seed: int = 0,
            model_name: str = "the model") -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration (n_calib, seq_len), held-out (<= n_eval, seq_len)) int64 windows from `source`."""
    g = torch.Generator().manual_seed(seed)
    if str(source) == "stdlib":
        all_w = text_windows(stdlib_text(), tok, seq_len)
        return _split(all_w, n_calib, n_eval, g, "stdlib")
    path = Path(source)
    if not path.exists():
        raise UserError(f"calibration data {path} does not exist: pass a token folder (<run>/tokenize/tokens), a "
                        f"text file, or 'stdlib'")
    if path.is_dir():
        from ember.data.loader import TokenShards, check_tokenizer, tokens_folder

        folder = tokens_folder(path)  # a UserError naming the folder when it holds no shards
        check_tokenizer(folder, tok, model_name)
        train = TokenShards(folder, "train", seq_len)
        meta_splits = train.meta["splits"]
        pick = torch.randperm(train.n_windows, generator=g)[:n_calib].sort().values.numpy()
        calib = torch.from_numpy(train.windows(pick)[:, :seq_len])
        if "val" in meta_splits:
            try:
                val = TokenShards(folder, "val", seq_len)
                ids = np.arange(min(n_eval, val.n_windows))
                return calib, torch.from_numpy(val.windows(ids)[:, :seq_len])
            except UserError:
                pass  # a val split shorter than one window: held out from train instead
        rest = np.setdiff1d(np.arange(train.n_windows), pick)[-n_eval:]
        return calib, torch.from_numpy(train.windows(rest)[:, :seq_len])
    return _split(text_windows(_text_of(path), tok, seq_len), n_calib, n_eval, g, str(path))


def _split(all_w: torch.Tensor, n_calib: int, n_eval: int, g, where: str):
    if len(all_w) < 2:
        raise UserError(f"{where}: fewer than 2 windows of tokens (got {len(all_w)}); give more text or a smaller "
                        f"--seq_len")
    n_eval = min(n_eval, len(all_w) // 2)
    head, tail = all_w[: len(all_w) - n_eval], all_w[len(all_w) - n_eval:]
    pick = torch.randperm(len(head), generator=g)[:n_calib].sort().values
    return head[pick], tail


@torch.no_grad()
def perplexity(model, wins: torch.Tensor, batch: int = 8) -> float:
    """exp(mean next-token cross-entropy) over the windows (each predicts its own tokens 1..T-1)."""
    if len(wins) == 0:
        return float("nan")
    total, count = 0.0, 0
    for i in range(0, len(wins), batch):
        w = wins[i:i + batch]
        nll = model(w[:, :-1], w[:, 1:], reduction="none")  # (b, T-1)
        total, count = total + float(nll.double().sum()), count + nll.numel()
    return float(np.exp(total / count))
