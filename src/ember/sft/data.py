"""SFT data: chat files -> conversations -> (inputs, targets) with prompt masking -> packed or padded rows.

A conversation is a list of {"role": "system"|"user"|"assistant", "content": str}. Data is JSONL, JSON (a
list), Parquet or a dataset as hf:NAME[[:CONFIG]:SPLIT] (common/records.py); each record is converted on load
from any of: {"messages": [...]}, ShareGPT {"conversations": [{"from", "value"}]}, Alpaca {"instruction",
"input", "output"}, Dolly {"instruction", "context", "response"}, {"prompt", "response"|"answer"|"completion"}
and OpenAssistant message trees (best-ranked path).
`stdlib_conversations()` builds the default set, needing no download, from the running Python's stdlib.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.common.errors import UserError
from ember.common.records import read_records
from ember.tokenizer.chat import render_chat

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}
# Alpaca's prompt template (also how the Dolly copy in shared/datasets wraps its prompts)
ALPACA_RE = re.compile(r"### Instruction:\s*(?P<instruction>.*?)\s*(?:### Input:\s*(?P<input>.*?)\s*)?### Response:\s*$",
                       re.S)


# ---------------------------------------------------------------------------- record -> messages

def _alpaca_user(instruction: str, inp: str | None) -> str:
    return instruction.strip() + (f"\n\n{inp.strip()}" if inp and inp.strip() else "")


def _oasst_path(node: dict) -> list[dict]:
    """Prompter/assistant turns along the best-ranked reply at each level of an OpenAssistant tree."""
    out = []
    while node:
        role = "user" if node.get("role") == "prompter" else "assistant"
        out.append({"role": role, "content": node.get("text", "")})
        replies = [r for r in node.get("replies") or [] if not r.get("deleted")]
        node = min(replies, key=lambda r: (r.get("rank") is None, r.get("rank") or 0), default=None)
    while out and out[-1]["role"] != "assistant":  # end on an answer
        out.pop()
    return out


def to_messages(rec, where: str) -> list[dict]:
    """One record of any supported format -> a validated conversation; UserError names `where` (file:line)."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {str(rec)[:60]!r}")
    if "messages" in rec:
        msgs = rec["messages"]
    elif "conversations" in rec:  # ShareGPT
        if not isinstance(rec["conversations"], list):
            raise UserError(f"{where}: 'conversations' must be a list of {{\"from\", \"value\"}} turns, got "
                            f"{str(rec['conversations'])[:60]!r}")
        msgs = [{"role": SHAREGPT_ROLES.get(str(m.get("from", "")).lower(), m.get("from")), "content": m.get("value")}
                for m in rec["conversations"] if isinstance(m, dict)]
    elif "instruction" in rec and ("output" in rec or "response" in rec):  # Alpaca; Dolly as the hub has it
        fmt, inp, out = ("Alpaca", "input", "output") if "output" in rec else ("Dolly", "context", "response")
        for k, ok in (("instruction", isinstance(rec["instruction"], str)),
                      (inp, isinstance(rec.get(inp), (str, type(None))))):  # input may be absent
            if not ok:
                raise UserError(f"{where}: {fmt} field '{k}' must be a string, got {rec[k]!r:.60}")
        msgs = [{"role": "user", "content": _alpaca_user(rec["instruction"], rec.get(inp))},
                {"role": "assistant", "content": rec[out]}]
    elif "prompt" in rec and isinstance(rec["prompt"], dict) and "replies" in rec["prompt"]:  # OASST tree
        msgs = _oasst_path(rec["prompt"])
    elif "prompt" in rec and any(k in rec for k in ("response", "answer", "completion")):
        prompt = rec["prompt"]
        answer = next(rec[k] for k in ("response", "answer", "completion") if k in rec)
        if isinstance(prompt, str) and (m := ALPACA_RE.search(prompt)):  # unwrap a templated prompt
            prompt = _alpaca_user(m["instruction"], m["input"])
        if isinstance(answer, str):
            answer = answer.removesuffix("###eos_token###").strip()  # the Dolly copy's literal end marker
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    else:
        raise UserError(f"{where}: unknown record format with keys {sorted(rec)[:6]}; use {{\"messages\": "
                        f"[{{\"role\", \"content\"}}, ...]}} (or ShareGPT, Alpaca, prompt/response, OASST)")
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: a conversation needs a non-empty list of messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {i} = {str(m)[:80]!r} must be {{'role': one of "
                            f"{', '.join(ROLES)}, 'content': a string}}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise UserError(f"{where}: conversation has no assistant message, so nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


class Conversation(list):
    """A conversation (a list of messages, JSON-serialised as one) that remembers where it came from, so an
    error found later (a chat template rejecting it) names its file:line."""
    where = "messages"


def load_conversations(spec: str | Path) -> list[list[dict]]:
    """Every conversation of a chat data source: a .jsonl / .json / .parquet file, a folder of them (sorted), or
    a dataset as hf:NAME[[:CONFIG]:SPLIT] (common/records.py); errors name the record's file:line or row."""
    out = []
    for place, rec in read_records(spec, "--data", fix="or leave `data` empty for the built-in stdlib instruction set"):
        conv = Conversation(to_messages(rec, place))
        conv.where = place
        out.append(conv)
    return out


# ---------------------------------------------------------------------------- the default set: stdlib

SYSTEM_PROMPT = "You are a concise assistant for Python programmers."


def _summary(doc: str) -> str:
    """First paragraph of a docstring as one line."""
    para = doc.strip().split("\n\n")[0]
    return " ".join(para.split())


def _function_pairs(tree: ast.Module, module: str) -> list[dict]:
    """qualname, name, params, args (params less self/cls), code without docstring, summary: per short
    documented function."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(child)
                if not doc or child.name.startswith("__") or len(child.body) < 2:
                    continue
                summary = _summary(doc)
                if not (20 <= len(summary) <= 200) or not summary[0].isupper() or ">>>" in summary:
                    continue
                bare = copy.copy(child)  # the function without its docstring and decorators
                bare.body, bare.decorator_list = child.body[1:], []
                try:
                    code = ast.unparse(bare)
                except Exception:  # a node unparse cannot render: skip the function
                    continue
                if len(code) > 500 or code.count("\n") > 14:
                    continue
                params = [a.arg for a in child.args.posonlyargs + child.args.args + child.args.kwonlyargs]
                found.append({"qualname": f"{module}.{prefix}{child.name}", "name": child.name, "params": params,
                              "args": [a for a in params if a not in ("self", "cls")], "code": code,
                              "summary": summary})

    visit(tree, "")
    return found


def _conversation(f: dict, rng: random.Random) -> list[dict]:
    """One of four turn kinds for a function: explain, write, name it, or explain + ask for its arguments.
    Each kind's reply opens differently (summary, code block, "Call it", "It takes"), so a small model can
    tell early which form, and so which ending, it is writing."""
    kind = rng.randrange(4)
    code = f"```python\n{f['code']}\n```"
    if kind == 0:
        turns = [("user", f"Explain what this Python function does:\n\n{code}"), ("assistant", f["summary"])]
    elif kind == 1:
        sig = f"{f['name']}({', '.join(f['params'])})"
        turns = [("user", f"Write a Python function `{sig}`. {f['summary']}"), ("assistant", code)]
    elif kind == 2:
        turns = [("user", f"Suggest a name for a Python function that does this: {f['summary']}"),
                 ("assistant", f"Call it `{f['name']}`.")]  # not "`name`": a reply opening like a code block
    else:
        args = ", ".join(f"`{a}`" for a in f["args"])
        turns = [("user", f"What does this function do?\n\n{code}"), ("assistant", f["summary"]),
                 ("user", "Which arguments does it take?"),
                 ("assistant", f"It takes {args}." if f["args"] else "It takes no arguments.")]
    msgs = [{"role": r, "content": c} for r, c in turns]
    if rng.random() < 0.3:
        msgs.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return msgs


def stdlib_files(max_files: int = 0) -> list[Path]:
    """The stdlib's .py files (tests and site-packages excluded), sorted; every max_files-th sample if capped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    if max_files and len(files) > max_files:
        files = files[:: len(files) // max_files][:max_files]  # spread over the alphabet, not its first letters
    return files


def stdlib_conversations(max_examples: int = 4000, seed: int = 0, max_files: int = 0) -> list[list[dict]]:
    """Instruction conversations made from documented stdlib functions (docstring <-> code), deterministic.

    Each function yields one conversation of a kind chosen by its name's hash; the list is shuffled by seed
    and capped at max_examples. Duplicate (summary, code) pairs are dropped.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    pairs, seen = [], set()
    for path in stdlib_files(max_files):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately not valid source (lib2to3 test data)
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for f in _function_pairs(tree, module):
            key = (f["summary"], f["code"])
            if key not in seen:
                seen.add(key)
                pairs.append(f)
    rng = random.Random(seed)
    rng.shuffle(pairs)
    convs = []
    for f in pairs[:max_examples]:
        h = int(hashlib.sha256(f["qualname"].encode()).hexdigest()[:8], 16)
        convs.append(_conversation(f, random.Random(h)))
    return convs


def split(convs: list[list[dict]], val_fraction: float) -> tuple[list, list]:
    """Held-out split by content hash: a conversation is in val iff its hash says so (stable under reordering)."""
    train, val = [], []
    for c in convs:
        h = int(hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:8], 16) / 16**8
        (val if h < val_fraction else train).append(c)
    return train, val


# ---------------------------------------------------------------------------- tokens, masks, rows

@dataclass
class Example:
    inputs: list[int]  # token ids fed to the model (the conversation without its last token)
    targets: list[int]  # next-token ids; -100 where no loss (prompt tokens unless train_on_all)
    truncated: bool = False  # the rendered conversation was longer than max_len and lost its end


def encode(tok, messages: list[dict], train_on_all: bool = False, max_len: int = 0) -> Example | None:
    """Render with the chat template and shift: targets[i] = ids[i + 1], kept where mask[i + 1] (or always).

    max_len truncates (keeping the start) to max_len inputs; returns None if nothing is left to train on.
    """
    ids, mask = render_chat(tok, messages, where=getattr(messages, "where", "messages"))
    inputs, targets = ids[:-1], [t if (m or train_on_all) else -100 for t, m in zip(ids[1:], mask[1:])]
    truncated = bool(max_len) and len(inputs) > max_len
    if truncated:
        inputs, targets = inputs[:max_len], targets[:max_len]
    if all(t == -100 for t in targets):
        return None
    return Example(inputs, targets, truncated)


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, -100 = ignored
    doc_ids: torch.Tensor | None  # (B, T) int64 when packed: conversation index within its row; else None

    def to(self, device) -> "Batch":
        return Batch(self.inputs.to(device), self.targets.to(device),
                     None if self.doc_ids is None else self.doc_ids.to(device))


def pack(examples: list[Example], seq_len: int) -> list[list[Example]]:
    """Greedy in-order packing: consecutive examples share a row while they fit in seq_len tokens."""
    rows, row, used = [], [], 0
    for ex in examples:
        n = len(ex.inputs)
        assert n <= seq_len, "truncate examples to seq_len before packing"
        if used + n > seq_len and row:
            rows.append(row)
            row, used = [], 0
        row.append(ex)
        used += n
    if row:
        rows.append(row)
    return rows


def collate(rows: list[list[Example]], pad_id: int, packed: bool, seq_len: int = 0) -> Batch:
    """Rows -> tensors. Packed: every row is seq_len long and doc_ids mark each conversation (padding gets its
    own id, so no real token ever attends to it); padded (one example a row): right-pad to the longest."""
    width = seq_len if packed else max(sum(len(e.inputs) for e in r) for r in rows)
    B = len(rows)
    inputs = torch.full((B, width), pad_id, dtype=torch.long)
    targets = torch.full((B, width), -100, dtype=torch.long)
    doc_ids = torch.zeros((B, width), dtype=torch.long)
    for b, row in enumerate(rows):
        pos = 0
        for d, ex in enumerate(row):
            n = len(ex.inputs)
            inputs[b, pos:pos + n] = torch.tensor(ex.inputs)
            targets[b, pos:pos + n] = torch.tensor(ex.targets)
            doc_ids[b, pos:pos + n] = d
            pos += n
        doc_ids[b, pos:] = len(row)
    return Batch(inputs, targets, doc_ids if packed else None)


def make_rows(examples: list[Example], seq_len: int, packed: bool) -> list[list[Example]]:
    return pack(examples, seq_len) if packed else [[e] for e in examples]


def batches(rows: list[list[Example]], batch_size: int, pad_id: int, packed: bool, seq_len: int,
            rng: random.Random | None = None):
    """One epoch of Batches; rows shuffled by rng when given (a training epoch), in order otherwise (eval)."""
    order = list(range(len(rows)))
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        yield collate([rows[j] for j in order[i:i + batch_size]], pad_id, packed, seq_len)


def stats(rows: list[list[Example]], seq_len: int, packed: bool) -> dict:
    """Token counts and, packed, the share of row slots holding real tokens (packing efficiency)."""
    real = sum(len(e.inputs) for r in rows for e in r)
    trained = sum(sum(t != -100 for t in e.targets) for r in rows for e in r)
    out = {"rows": len(rows), "conversations": sum(len(r) for r in rows), "tokens": real, "trained_tokens": trained}
    if packed:
        out["fill"] = round(real / max(len(rows) * seq_len, 1), 4)
    return out
