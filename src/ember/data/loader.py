"""Pretraining batches from token shards: packed windows, deterministic, rank-sharded and resumable.

    train = TokenLoader("runs/q/tokenize/tokens", "train", batch_size=8, seq_len=256, seed=0, rank=0, world_size=1)
    x, y = train.next_batch()                  # (B, T) int64 each; y[:, t] is the token after x[:, t]
    state = train.state_dict()                 # save with the checkpoint; load_state_dict(state) resumes exactly
    mix = MixtureLoader([(a, 0.7), (b, 0.3)], seed=0)    # rows drawn from several token folders by weight
    loader = open_loader([folder_a, folder_b], [0.7, 0.3], batch_size=8, seq_len=256)   # either of the above
    for x, y in val_batches("runs/q/tokenize/tokens", 8, 256, max_batches=20): ...

A shard of n tokens holds (n - 1) // T windows of T + 1 tokens at stride T (documents are packed across
windows, each ended by the tokenizer's EOS: `document_frame`). Each epoch visits every window once in the
order of a permutation seeded by (seed, epoch). All ranks walk one global stream of windows: step s of
rank r takes stream positions (s * world_size + r) * B ... + B - 1, so ranks never overlap, and their union
at step s is what one rank would see over steps s * world_size ... + world_size - 1. The state is a single
cursor into that stream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ember.common import artifacts
from ember.common.errors import UserError


def tokens_folder(folder: str | Path) -> Path:
    """The folder holding meta.json + .bin shards: given directly, or a tokenize stage folder holding tokens/."""
    folder = Path(folder)
    if (folder / "meta.json").is_file() and "splits" in (artifacts.read_meta(folder) or {}):
        return folder
    if (folder / "tokens" / "meta.json").is_file():
        return folder / "tokens"
    raise UserError(f"no token shards at {folder} (expected meta.json with .bin shards, as `ember tokenize` "
                    f"writes to <run>/tokenize/tokens/). Run `ember tokenize` first or fix the path.")


class TokenShards:
    """The memory-mapped .bin shards of one split and the windows of seq_len + 1 tokens they hold."""

    def __init__(self, folder: str | Path, split: str, seq_len: int):
        self.folder = tokens_folder(folder)
        self.meta = artifacts.read_json(self.folder / "meta.json")
        if split not in self.meta["splits"]:
            raise UserError(f"{self.folder}: no split '{split}' (have {', '.join(self.meta['splits'])})")
        self.dtype, self.seq_len = np.dtype(self.meta["dtype"]), seq_len
        self.maps, counts = [], []
        for s in self.meta["splits"][split]["shards"]:
            path = self.folder / s["file"]
            if not path.is_file() or path.stat().st_size != s["tokens"] * self.dtype.itemsize:
                raise UserError(f"{path}: missing or truncated (meta.json says {s['tokens']} {self.dtype.name} "
                                f"tokens). Rerun `ember tokenize --force`.")
            # an empty shard holds no window (and numpy cannot map an empty file)
            self.maps.append(np.memmap(path, dtype=self.dtype, mode="r") if s["tokens"] else np.zeros(0, self.dtype))
            counts.append(max(0, (s["tokens"] - 1) // seq_len))
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # first window id of each shard
        self.n_windows = int(self.starts[-1])
        if self.n_windows == 0:
            raise UserError(f"{self.folder}: the '{split}' split has fewer than seq_len + 1 = {seq_len + 1} tokens "
                            f"per shard; lower seq_len or tokenize more documents")

    def windows(self, ids: np.ndarray) -> np.ndarray:
        """(n, seq_len + 1) int64 tokens of the given window ids."""
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        for i, (s, w) in enumerate(zip(shard, ids)):
            off = int(w - self.starts[s]) * self.seq_len
            out[i] = self.maps[s][off:off + self.seq_len + 1]
        return out


def to_xy(rows: np.ndarray, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(n, T + 1) rows -> inputs x and targets y, (n, T) int64 each, on `device`."""
    t = torch.from_numpy(rows)
    x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
    if str(device) != "cpu":
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


class TokenLoader:
    """Infinite shuffled training batches of one split; see the module docstring for the order."""

    def __init__(self, folder: str | Path, split: str = "train", batch_size: int = 8, seq_len: int = 256,
                 seed: int = 0, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu"):
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1")
        self.data = TokenShards(folder, split, seq_len)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.vocab_size = int(self.data.meta["vocab_size"])
        self.cursor = 0  # windows consumed by all ranks together: the whole state
        self._perms: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> float:
        return self.cursor / self.data.n_windows

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 1:  # batches span at most two epochs: keep two permutations
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.data.n_windows)
        return self._perms[epoch]

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """(n, T + 1) tokens at these positions of the global window stream."""
        n = self.data.n_windows
        ids = np.array([self._perm(int(p // n))[p % n] for p in positions], dtype=np.int64)
        return self.data.windows(ids)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), (B, T) int64 each."""
        B = self.batch_size
        positions = self.cursor + self.rank * B + np.arange(B, dtype=np.int64)
        self.cursor += B * self.world_size
        return to_xy(self.rows(positions), self.device)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "seed": self.seed, "seq_len": self.seq_len, "n_windows": self.data.n_windows}

    def load_state_dict(self, state: dict) -> None:
        """Resume where `state` was taken; world_size and batch_size may differ (the cursor is global)."""
        mine = self.state_dict()
        for key in ("seed", "seq_len", "n_windows"):
            if state.get(key) != mine[key]:
                raise UserError(f"loader state does not match this data: {key} was {state.get(key)}, now {mine[key]} "
                                f"(the token shards or loader settings changed since the checkpoint)")
        self.cursor = int(state["cursor"])


class MixtureLoader:
    """Batches whose rows come from several TokenLoaders with given weights (e.g. 70% stdlib, 30% other).

    Every rank draws the same source for each row of the global batch from rng(seed, step), and each
    source's rows take consecutive positions of that source's stream, so the rank and resume guarantees
    of TokenLoader carry over. The sub-loaders' cursors are part of this loader's state.
    """

    def __init__(self, sources: list[tuple[TokenLoader, float]], seed: int = 0):
        if not sources:
            raise UserError("MixtureLoader needs at least one (loader, weight) pair")
        first = sources[0][0]
        for loader, w in sources:
            same = (loader.batch_size, loader.seq_len, loader.rank, loader.world_size) == \
                   (first.batch_size, first.seq_len, first.rank, first.world_size)
            if not same or not w > 0:
                raise UserError(f"mixture source {loader.data.folder}: weight {w} must be > 0 and batch_size, "
                                f"seq_len, rank, world_size must match the first source's")
        self.loaders = [l for l, _ in sources]
        same_tokenizer(self.loaders)
        total = sum(w for _, w in sources)
        self.weights = np.array([w / total for _, w in sources])
        self.seed, self.step = seed, 0
        self.vocab_size = max(l.vocab_size for l in self.loaders)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.loaders[0]
        B, ws, r = first.batch_size, first.world_size, first.rank
        choice = np.random.default_rng([self.seed, self.step]).choice(len(self.loaders), size=B * ws, p=self.weights)
        rows = np.empty((B, first.seq_len + 1), dtype=np.int64)
        mine = slice(r * B, (r + 1) * B)
        for k, loader in enumerate(self.loaders):
            hit = choice == k
            order = np.cumsum(hit) - 1  # index of each row among this source's rows of the global batch
            sel = hit[mine]
            if sel.any():
                rows[sel] = loader.rows(loader.cursor + order[mine][sel])
            loader.cursor += int(hit.sum())
        self.step += 1
        return to_xy(rows, first.device)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "weights": self.weights.tolist(),
                "sources": [l.state_dict() for l in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["sources"]) != len(self.loaders) or not np.allclose(state["weights"], self.weights):
            raise UserError(f"mixture state has weights {state['weights']}, this mixture {self.weights.tolist()}")
        for loader, s in zip(self.loaders, state["sources"]):
            loader.load_state_dict(s)
        self.step = int(state["step"])


def open_loader(folders: str | Path | list, weights: list[float] | None = None, batch_size: int = 8,
                seq_len: int = 256, seed: int = 0, rank: int = 0, world_size: int = 1,
                device: str | torch.device = "cpu") -> TokenLoader | MixtureLoader:
    """The train loader of one token folder, or a MixtureLoader over several (weights relative, default equal)."""
    folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
    weights = list(weights) if weights is not None else [1.0] * len(folders)
    if len(weights) != len(folders):
        raise UserError(f"{len(folders)} token folders but {len(weights)} weights")
    loaders = [TokenLoader(f, "train", batch_size, seq_len, seed, rank, world_size, device) for f in folders]
    return loaders[0] if len(loaders) == 1 else MixtureLoader(list(zip(loaders, weights)), seed)


# ---------------------------------------------------------------------------- shards and their tokenizer

def document_frame(tok) -> tuple[list[int], int]:
    """(ids before each document, id after it) in token shards. Every document ends with the tokenizer's EOS
    (the boundary the shard writer and document counts use: text never encodes to a special id). ember's own
    tokenizer writes nothing before (the previous document's <|eos|> marks the start, as ember always trained).
    Another model's tokenizer puts its BOS first when it adds one to every input, as its own pretraining did:
    Llama 2/3, Mistral, llama2.c (`BOS doc EOS`, torchtitan's Llama rule); GPT-2-style vocabularies without
    BOS (SmolLM, Qwen) get `doc EOS` (their <|endoftext|> separator), as do those whose BOS is their EOS
    (GPT-2's <|endoftext|>: the previous document's EOS already opens the next)."""
    if tok.eos_id is None:
        raise UserError(f"tokenizer {tok.path or tok.kind}: it names no EOS token, which separates documents in "
                        f"token shards; pass a tokenizer whose config names its eos_token")
    bos = tok.kind != "ember" and tok.add_bos and tok.bos_id != tok.eos_id
    return ([tok.bos_id] if bos else []), tok.eos_id


def vocab_sha256(tok) -> str:
    """sha256 of what the ids mean (every id's token string, and the BOS/EOS ids): equal for two files of one
    vocabulary (a model's GGUF and its tokenizer.json), unlike the file hash."""
    import hashlib

    h = hashlib.sha256(f"{tok.bos_id},{tok.eos_id}\n".encode())
    for i in range(tok.vocab_size):
        h.update((tok.id_to_token(i) or "").encode("utf-8", "replace") + b"\0")
    return h.hexdigest()


def check_tokenizer(folder: str | Path, tok, model: str) -> None:
    """Refuse token shards made by another tokenizer than `model`'s own (`tok`): the same ids would mean other
    text. Shards whose meta.json records no tokenizer hash are not checked."""
    meta = artifacts.read_json(tokens_folder(folder) / "meta.json")
    want = meta.get("tokenizer_sha256")
    if not want or want == tok.sha256 or meta.get("tokenizer_vocab_sha256") == vocab_sha256(tok):
        return
    raise UserError(f"{folder}: these tokens were made by the tokenizer {meta.get('tokenizer', '?')} (sha256 "
                    f"{want[:12]}), not by the tokenizer of {model} ({tok.path or tok.kind}, sha256 "
                    f"{tok.sha256[:12]}), so their ids mean other text to this model; re-tokenize with `ember tokenize "
                    f"--tokenizer={tok.path or model}`")


def same_tokenizer(loaders: list[TokenLoader]) -> None:
    """Token ids from different tokenizers mean different things: refuse to mix them."""
    hashes = {l.data.meta.get("tokenizer_sha256") for l in loaders}
    if len(hashes) > 1:
        raise UserError("the token folders " + ", ".join(str(l.data.folder) for l in loaders) + " were made by "
                        "different tokenizers; re-tokenize them with one tokenizer before mixing")


def val_batches(folders: str | Path | list, batch_size: int, seq_len: int, max_batches: int | None = None,
                rank: int = 0, world_size: int = 1, split: str = "val", device: str | torch.device = "cpu"):
    """The same (x, y) batches on every call: windows in order, batch k of rank r = global batch k * ws + r.

    Several folders (a mixture) take turns, batch by batch, up to max_batches in all. Every rank yields the
    same number of full batches; a split smaller than one batch per rank uses a smaller batch size.
    """
    folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
    streams = [_val_stream(f, batch_size, seq_len, rank, world_size, split, device) for f in folders]
    n = 0
    while streams and (max_batches is None or n < max_batches):
        for s in list(streams):
            batch = next(s, None)
            if batch is None:
                streams.remove(s)
                continue
            yield batch
            n += 1
            if max_batches is not None and n >= max_batches:
                return


def _val_stream(folder, batch_size: int, seq_len: int, rank: int, world_size: int, split: str, device):
    data = TokenShards(folder, split, seq_len)
    if data.n_windows < world_size:
        raise UserError(f"{data.folder}: the '{split}' split has {data.n_windows} windows of {seq_len + 1} tokens, "
                        f"fewer than world_size={world_size}; lower seq_len or add documents to it")
    B = min(batch_size, data.n_windows // world_size)
    for k in range(data.n_windows // (B * world_size)):
        start = (k * world_size + rank) * B
        yield to_xy(data.windows(np.arange(start, start + B, dtype=np.int64)), device)
