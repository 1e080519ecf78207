"""`ember tokenizer`: train a byte-level BPE tokenizer (HF `tokenizers`) on the run's documents.

    ember tokenizer                              # vocab 4096 on <run>/curate (or <run>/corpus with no curate)
    ember tokenizer --vocab_size=8192 --docs=runs/big/curate

Writes `<run>/tokenizer/tokenizer.json` (loadable by `tokenizers.Tokenizer.from_file` and by transformers'
`PreTrainedTokenizerFast`) plus `tokenizer_config.json` with the special tokens and the chat template.
Documents in the validation split (the same id hash as `ember tokenize`) are held out: the reported
compression (UTF-8 bytes per token) is measured on them, beside GPT-2's tokenizer when its files exist.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ember.common import artifacts
from ember.common.config import require
from ember.common.log import print0
from ember.common.paths import shared_dataset
from ember.data.documents import read_shards
from ember.data.tokenize import docs_input, is_val
from ember.tokenizer.special import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, sha256_file

MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # every byte, every special token, at least one merge
HELD_OUT_MAX_BYTES = 16 << 20  # enough text for a stable bytes/token figure; bounds memory on big corpora


@dataclass
class Config:
    run: str = "runs/default"  # run folder; this stage writes <run>/tokenizer/
    docs: str = ""  # document shards to train on; empty = <run>/curate, or <run>/corpus if the run has no curate stage
    vocab_size: int = 4096  # total ids incl. 256 byte tokens and 7 special tokens; <= 65536 keeps uint16 shards
    min_frequency: int = 2  # a pair must occur this often to be merged (1 memorizes rare strings)
    max_train_bytes: int = 0  # use at most this many UTF-8 bytes of training text (0 = all); bounds time
    val_fraction: float = 0.05  # documents held out for the compression report; keep equal to tokenize's
    reference: str = ""  # GPT-2 vocab+merges folder to compare with; "" = gpt2_tokenizer in the datasets folder; skipped if absent

    def __post_init__(self):
        require(MIN_VOCAB <= self.vocab_size <= 2**31, "vocab_size", self.vocab_size,
                f"an integer in [{MIN_VOCAB}, 2^31] (256 bytes + {len(SPECIAL_TOKENS)} special tokens + merges)")
        require(self.min_frequency >= 1, "min_frequency", self.min_frequency, "an integer >= 1")
        require(self.max_train_bytes >= 0, "max_train_bytes", self.max_train_bytes, "0 (all) or a byte count")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", self.val_fraction, "a fraction in [0, 1)")


PRESETS = {
    "quickstart": lambda: Config(vocab_size=4096),  # ~3 s on the 12 MB stdlib corpus
    "smoke": lambda: Config(vocab_size=768),
}


def build(vocab_size: int, min_frequency: int = 2):
    """An untrained byte-level BPE tokenizer and its trainer (special tokens get ids 0..6)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> 256 printable chars
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    return tok, trainer


def train_tokenizer(texts, vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train on an iterable of strings; returns the ember wrapper (see tokenizer/special.py)."""
    tok, trainer = build(vocab_size, min_frequency)
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok)


def gpt2_reference(folder: str | Path):
    """GPT-2's tokenizer (HF tokenizers) from gpt2_vocab.json + gpt2_merges.txt, or None if absent."""
    folder = Path(folder)
    vocab, merges = folder / "gpt2_vocab.json", folder / "gpt2_merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        return None
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's own regex and byte map
    tok.decoder = decoders.ByteLevel()
    return tok




def bytes_per_token(encode_batch, texts: list[str]) -> float | None:
    n_tokens = sum(len(ids) for ids in encode_batch(texts))
    return round(sum(len(t.encode("utf-8")) for t in texts) / n_tokens, 4) if n_tokens else None


def save(tok: Tokenizer, folder: Path) -> None:
    """tokenizer.json (adds BOS like ember does) + tokenizer_config.json with the chat template: see Tokenizer.save."""
    tok.save(folder)


def main(cfg: Config) -> dict:
    docs_dir = docs_input(cfg.docs, cfg.run)
    run = artifacts.begin("tokenizer", cfg, inputs={"docs": docs_dir})
    if run.cached:
        return run.metrics

    # data: training documents stream in; held-out ones are kept for the compression report
    held_out: list[str] = []
    held_bytes = [0]
    stats = {"train_docs": 0, "train_bytes": 0}

    def train_texts() -> Iterator[str]:
        for d in read_shards(docs_dir):
            if is_val(d["id"], cfg.val_fraction):
                if held_bytes[0] < HELD_OUT_MAX_BYTES:
                    held_out.append(d["text"])
                    held_bytes[0] += len(d["text"].encode("utf-8"))
                continue
            if cfg.max_train_bytes and stats["train_bytes"] >= cfg.max_train_bytes:
                continue  # keep scanning: the held-out documents are spread over the whole corpus
            stats["train_docs"] += 1
            stats["train_bytes"] += len(d["text"].encode("utf-8"))
            yield d["text"]

    t0 = time.time()
    tok, trainer = build(cfg.vocab_size, cfg.min_frequency)
    tok.train_from_iterator(train_texts(), trainer)
    train_s = time.time() - t0
    ours = Tokenizer(tok)
    save(ours, run.dir)

    metrics = {**stats, "vocab_size": ours.vocab_size, "special_tokens": ours.ids, "train_seconds": round(train_s, 2),
               "sha256": sha256_file(run.dir / "tokenizer.json"), "held_out_docs": len(held_out),
               "held_out_bytes": held_bytes[0]}
    if held_out:
        metrics["bytes_per_token"] = bytes_per_token(ours.encode_batch, held_out)
        ref_dir = cfg.reference or shared_dataset("gpt2_tokenizer")  # ($EMBER_DATASETS or ../shared/datasets)
        ref = gpt2_reference(ref_dir) if ref_dir else None
        if ref is not None:
            metrics["gpt2_bytes_per_token"] = bytes_per_token(lambda ts: [e.ids for e in ref.encode_batch(ts)], held_out)
    line = (f"[tokenizer] vocab {ours.vocab_size} trained on {stats['train_bytes'] / 1e6:.1f} MB "
            f"({stats['train_docs']} docs) in {train_s:.1f}s")
    if "bytes_per_token" in metrics:
        line += f"; held-out bytes/token {metrics['bytes_per_token']}"
    if "gpt2_bytes_per_token" in metrics:
        line += f" (GPT-2, vocab 50257: {metrics['gpt2_bytes_per_token']})"
    print0(line)
    return run.finish(metrics)


if __name__ == "__main__":
    from ember.cli import module_main

    module_main(__name__)
