"""Preference and RL data: loaders for the fixed formats, real-data converters, and no-download defaults.

Preferences = `{"prompt", "chosen", "rejected"}` (prompt: a string, or a list of {"role","content"} turns);
RL tasks = `{"prompt", "answer"}`, or code tasks `{"prompt", "entry_point", "test"}` (+ optional "prefix") whose
reward runs the reply in the sandbox (common/sandbox). `load_preferences` also reads hh-rlhf dialogues and OpenAssistant trees,
`load_tasks` also reads GSM8K. Every loader reads JSONL, JSON, Parquet or a dataset as hf:NAME[[:CONFIG]:SPLIT]
(common/records.py). Defaults that need no download: `stdlib_pairs` (real Python from the
running interpreter's stdlib vs a corrupted copy) and `arithmetic_tasks` (exact-answer arithmetic).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sysconfig
from pathlib import Path
from typing import Iterator

from ember.common.errors import UserError
from ember.common.jsonl import read_jsonl as _read_jsonl
from ember.common.records import input_identity, read_records

Messages = list[dict]  # [{"role": "user" | "assistant" | "system", "content": str}, ...]


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a .jsonl(.gz) file (common/jsonl.py): JSONL only; `records` reads every source."""
    return _read_jsonl(path, missing="pass --data=<a .jsonl or .jsonl.gz file>")


def records(spec: str | Path) -> Iterator[tuple[str, dict]]:
    """(place, record) of a preference/prompt/task source: .jsonl, .json, .parquet, a folder of them, or
    hf:NAME[[:CONFIG]:SPLIT] (common/records.py); place is file:line, file:row N or hf:NAME[split]#i."""
    return read_records(spec, "--data")


# ---------------------------------------------------------------------------- checking records


def check_prompt(prompt, where: str):
    ok = isinstance(prompt, str) or (isinstance(prompt, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt))
    if not ok:
        raise UserError(f"{where}: 'prompt' must be a string or a list of {{\"role\", \"content\"}} turns")


# ---------------------------------------------------------------------------- preferences


def load_preferences(path: str | Path, limit: int = 0) -> list[dict]:
    """Preference pairs from any of: our format, hh-rlhf (`{"chosen","rejected"}` Human/Assistant dialogues),
    OpenAssistant message trees (ranked sibling replies -> pairs). The format is read from each record.
    limit > 0 stops reading once that many pairs are in (a streamed hub dataset is not read to its end)."""
    pairs = []
    for where, rec in records(path):
        if limit and len(pairs) >= limit:
            break
        if "message_tree_id" in rec and isinstance(rec.get("prompt"), dict):
            pairs += oasst_pairs(rec["prompt"])
        elif {"prompt", "chosen", "rejected"} <= rec.keys():
            check_prompt(rec["prompt"], where)
            if not (isinstance(rec["chosen"], str) and isinstance(rec["rejected"], str)):
                raise UserError(f"{where}: 'chosen' and 'rejected' must be strings")
            pairs.append({"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"]})
        elif {"chosen", "rejected"} <= rec.keys():
            pair = hh_pair(rec["chosen"], rec["rejected"])
            if pair is not None:
                pairs.append(pair)
        else:
            raise UserError(f"{where}: a preference record needs keys prompt, chosen, rejected (has "
                            f"{', '.join(sorted(rec)) or 'none'}); hh-rlhf and OpenAssistant tree files are also read")
    if not pairs:
        raise UserError(f"{path}: no preference pairs found")
    return pairs[:limit] if limit else pairs


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_dialogue(text: str) -> Messages:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{"role": "user", ...}, {"role": "assistant", ...}]."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    turns = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return turns


def hh_pair(chosen: str, rejected: str) -> dict | None:
    """One hh-rlhf record -> a pair: the shared dialogue is the prompt, the two final replies differ.
    None when the dialogues do not share everything but the last assistant turn (a few records)."""
    c, r = parse_hh_dialogue(chosen), parse_hh_dialogue(rejected)
    if len(c) < 2 or len(c) != len(r) or c[-1]["role"] != "assistant" or c[:-1] != r[:-1]:
        return None
    if c[-1]["content"] == r[-1]["content"] or not c[-1]["content"] or not r[-1]["content"]:
        return None
    return {"prompt": c[:-1], "chosen": c[-1]["content"], "rejected": r[-1]["content"]}


def oasst_pairs(node: dict, history: Messages | None = None) -> list[dict]:
    """Pairs from an OpenAssistant tree: at every user turn, each ranked assistant reply is preferred over
    every reply ranked below it (rank 0 = best, by human votes); then recurse down every reply."""
    history = (history or []) + [{"role": "user" if node["role"] == "prompter" else "assistant",
                                  "content": node["text"]}]
    replies = [r for r in node.get("replies", []) if not r.get("deleted")]
    pairs = []
    if node["role"] == "prompter":
        ranked = sorted((r for r in replies if r.get("rank") is not None), key=lambda r: r["rank"])
        for a in range(len(ranked)):
            for b in range(a + 1, len(ranked)):
                if ranked[a]["rank"] < ranked[b]["rank"]:
                    pairs.append({"prompt": list(history), "chosen": ranked[a]["text"], "rejected": ranked[b]["text"]})
    for r in replies:
        pairs += oasst_pairs(r, history)
    return pairs


def prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def conversation_key(prompt) -> str:
    """What ties records to one conversation: its opening user turn. Every pair of an OpenAssistant tree
    shares the root prompt, and hh-rlhf's follow-ups share their first question; a plain prompt is itself."""
    if isinstance(prompt, str):
        return prompt
    first = next((m for m in prompt if m.get("role") == "user"), prompt[0] if prompt else {})
    return json.dumps(first, sort_keys=True)


def split_heldout(records: list[dict], val_frac: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, val) split by a hash of the conversation's opening turn, so pairs of one conversation (every
    depth of an OpenAssistant tree, hh-rlhf follow-ups) land on the same side and the split does not change
    when records are added or reordered. At least one conversation goes to each side."""
    def frac(key):
        h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2 ** 64

    key_of = [conversation_key(r["prompt"]) for r in records]  # once per record: a JSON dump each
    keys = set(key_of)
    val_keys = {k for k in keys if frac(k) < val_frac}
    if val_frac > 0 and len(records) >= 2 and (not val_keys or val_keys == keys):
        if len(keys) < 2:
            raise UserError(f"all {len(records)} records come from one conversation, so no held-out split can keep "
                            f"it out of training: give pairs from at least two conversations")
        ordered = sorted(keys, key=frac)  # whole conversations, the lowest hashes held out
        val_keys = set(ordered[:min(max(1, round(val_frac * len(keys))), len(keys) - 1)])
    train = [r for r, k in zip(records, key_of) if k not in val_keys]
    val = [r for r, k in zip(records, key_of) if k in val_keys]
    return train, val


def preference_split(spec: str, n_pairs: int, val_frac: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, val) pairs for a stage's `data` setting: "stdlib" = n_pairs synthetic pairs, else a file
    (at most n_pairs of it, 0 = all)."""
    pairs = stdlib_pairs(n_pairs, seed) if spec == "stdlib" else load_preferences(spec, limit=n_pairs)
    train, val = split_heldout(pairs, val_frac, seed)
    if not train or not val:
        raise UserError(f"data={spec}: {len(pairs)} pairs leave an empty train or held-out split "
                        f"(val_frac={val_frac}); give more pairs")
    return train, val


def data_inputs(spec: str) -> dict:
    """The `inputs` entry for artifacts.begin: a data file is hashed into the run's lineage, an hf: dataset is
    recorded by its identity (name, config, split, revision; common/records.input_identity), built-ins not."""
    return {} if spec in ("stdlib", "arithmetic") else {"data": input_identity(spec, "--data")}


def read_prompts(spec: str | Path) -> list:
    """Prompts of a source for on-policy RL (PPO): a task source (its records carry an answer) gives its
    prompts, a preference source (ours, hh-rlhf, OpenAssistant trees) the prompt of each pair, else each
    record's own "prompt". The first record tells which."""
    first = next(iter(records(spec)), ("", {}))[1]
    if "answer" in first:
        return [t["prompt"] for t in load_tasks(spec)]
    if "chosen" in first or "message_tree_id" in first:
        return [p["prompt"] for p in load_preferences(spec)]
    prompts = []
    for where, rec in records(spec):
        if "prompt" not in rec:
            raise UserError(f"{where}: PPO reads prompts from preference, task or {{\"prompt\"}} records; this "
                            f"one has {', '.join(sorted(rec)) or 'none'}")
        check_prompt(rec["prompt"], where)
        prompts.append(rec["prompt"])
    return prompts


# ---------------------------------------------------------------------------- synthetic pairs: real vs corrupted code


def stdlib_sources(max_files: int = 400, seed: int = 0) -> list[str]:
    """Texts of up to max_files .py files of the running interpreter's standard library (sorted, sampled)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    if not files:
        raise UserError(f"no .py files under {root}: the stdlib corpus needs the interpreter's sources")
    random.Random(seed).shuffle(files)
    texts = []
    for p in files[:max_files]:
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def corrupt(text: str, rng: random.Random) -> str:
    """A plausible-looking but wrong copy of code: one of shuffled lines, shuffled words, or ~25% of
    characters replaced. Whitespace layout is kept, so length alone does not give it away."""
    kind = rng.randrange(3)
    lines = text.split("\n")
    if kind == 0 and len(set(lines)) >= 2:  # distinct lines, so some order differs from the original
        body = lines[:]
        while body == lines:
            rng.shuffle(body)
        return "\n".join(body)
    if kind <= 1:
        out = []
        for line in lines:
            indent = line[:len(line) - len(line.lstrip())]
            words = line.split()
            rng.shuffle(words)
            out.append(indent + " ".join(words))
        if "\n".join(out) != text:
            return "\n".join(out)
    alphabet = "abcdefghijklmnopqrstuvwxyz_()[]:=.,0123456789"
    chars = [rng.choice(alphabet) if not c.isspace() and rng.random() < 0.25 else c for c in text]
    return "".join(chars)


def stdlib_pairs(n: int, seed: int = 0, prompt_lines: int = 3, response_lines: int = 3,
                 max_chars: int = 240) -> list[dict]:
    """n preference pairs: prompt = a few lines of real stdlib code, chosen = the lines that really follow,
    rejected = a corrupted copy of them. Short, so tiny models and short context windows can use them."""
    rng = random.Random(seed)
    snippets = []
    for text in stdlib_sources(seed=seed):
        lines = [ln.rstrip() for ln in text.split("\n")]
        for start in range(0, len(lines) - prompt_lines - response_lines, prompt_lines + response_lines):
            head = lines[start:start + prompt_lines]
            tail = lines[start + prompt_lines:start + prompt_lines + response_lines]
            # skip blank, comment-only or docstring-ish chunks: there is little code to corrupt there
            if sum(bool(ln.strip()) for ln in tail) < 2 or any(len(ln) > 100 for ln in head + tail):
                continue
            if any(ln.lstrip().startswith(("#", '"""', "'''")) for ln in tail):
                continue
            prompt, chosen = "\n".join(head), "\n".join(tail).strip("\n")
            if len(prompt) + len(chosen) <= max_chars and len(chosen.split()) >= 4:
                snippets.append((prompt, chosen))
    rng.shuffle(snippets)
    if len(snippets) < n:
        raise UserError(f"stdlib_pairs: asked for {n} pairs, the stdlib gives {len(snippets)}; lower --n_pairs")
    pairs = []
    for prompt, chosen in snippets[:n]:
        pairs.append({"prompt": "Continue this Python code:\n" + prompt, "chosen": chosen, "rejected": corrupt(chosen, rng)})
    return pairs


# ---------------------------------------------------------------------------- RL tasks with verifiable answers


_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"]
_ITEMS = ["apples", "books", "coins", "pencils", "stamps", "shells", "cards", "marbles"]


def arithmetic_task(rng: random.Random, max_operand: int = 20, word_problems: bool = True,
                    operations: str = "+-*") -> dict:
    """One task with an exact integer answer: `a + b`, `a - b` (non-negative) or `a * b` (small factors),
    as a bare expression or a one-sentence word problem."""
    op = rng.choice(operations)
    if op == "*":
        a, b = rng.randint(0, min(max_operand, 12)), rng.randint(0, min(max_operand, 12))
    else:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if op == "-" and b > a:
            a, b = b, a
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    if word_problems and rng.random() < 0.5:
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        prompt = {
            "+": f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            "-": f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?",
            "*": f"{name} has {a} bags with {b} {item} in each. How many {item} does {name} have?",
        }[op]
    else:
        prompt = f"What is {a} {op} {b}?"
    return {"prompt": prompt, "answer": str(answer)}


def arithmetic_tasks(n: int, seed: int = 0, max_operand: int = 20, word_problems: bool = True,
                     operations: str = "+-*") -> list[dict]:
    if not operations or set(operations) - set("+-*"):
        raise UserError(f"operations={operations!r}: use a non-empty combination of + - *")
    rng = random.Random(seed)
    return [arithmetic_task(rng, max_operand, word_problems, operations) for _ in range(n)]


def gsm8k_answer(solution: str) -> str:
    """GSM8K's final answer: the number after '####', commas removed ('#### 1,000' -> '1000')."""
    if "####" not in solution:
        raise ValueError("no '####' in the GSM8K answer")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def load_tasks(path: str | Path) -> list[dict]:
    """RL tasks from `{"prompt","answer"}` or GSM8K `{"question","answer": "...#### 72"}` records (any source
    `records` reads: JSONL, JSON, Parquet, hf:openai/gsm8k:main)."""
    tasks = []
    for where, rec in records(path):
        if "question" in rec and "answer" in rec:  # GSM8K
            try:
                tasks.append({"prompt": rec["question"], "answer": gsm8k_answer(str(rec["answer"]))})
            except ValueError:
                raise UserError(f"{where}: GSM8K answer without '#### <number>'") from None
        elif "prompt" in rec and "entry_point" in rec and "test" in rec:  # code: the reply must pass `test`
            check_prompt(rec["prompt"], where)
            for key in ("entry_point", "test", "prefix"):
                if not isinstance(rec.get(key, ""), str):
                    raise UserError(f"{where}: {key} must be a string (Python source), got {type(rec[key]).__name__}")
            tasks.append({"prompt": rec["prompt"], "entry_point": rec["entry_point"], "test": rec["test"],
                          "prefix": rec.get("prefix", "")})
        elif "prompt" in rec and "answer" in rec:
            check_prompt(rec["prompt"], where)
            tasks.append({"prompt": rec["prompt"], "answer": str(rec["answer"]).strip()})
        else:
            raise UserError(f"{where}: an RL task needs keys prompt and answer (or GSM8K's question and "
                            f"answer, or prompt, entry_point and test for code); this record has "
                            f"{', '.join(sorted(rec)) or 'none'}")
    if not tasks:
        raise UserError(f"{path}: no tasks found")
    return tasks


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The final answer in a completion: the number after the last '####' or 'answer' if any, else the
    last number in the text; commas and a trailing '.0' removed. None when there is no number."""
    for marker in ("####", "answer is", "answer:", "Answer:"):
        if marker in text:
            tail = _NUMBER.findall(text.rsplit(marker, 1)[1])
            if tail:
                return _normalize(tail[0])
    nums = _NUMBER.findall(text)
    return _normalize(nums[-1]) if nums else None


def _normalize(num: str) -> str:
    num = num.replace(",", "")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return num


def exact_match(completion: str, answer: str) -> bool:
    """Verifiable reward: the completion's final number equals the reference answer exactly."""
    got = extract_answer(completion)
    return got is not None and got == _normalize(answer.strip())


_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.S)


def extract_code(completion: str) -> str:
    """The program in a reply: the first fenced block if there is one, else the whole reply."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


def code_passes(task: dict, completion: str, timeout: float = 5.0) -> bool:
    """Verifiable reward for code: the reply (after the task's prefix) defines `entry_point`, and the task's
    `test` (which defines check(candidate), as HumanEval) passes against it -- run in the sandbox, with a verdict
    the reply cannot forge (the tests run in a second sandbox; the reply only answers calls with plain data)."""
    from ember.common.sandbox import run_function_tests

    prefix = task.get("prefix", "")
    # the prefix is trusted task data: the tests may call helpers it defines (as HumanEval/32's tests use `poly`)
    return run_function_tests(prefix + extract_code(completion), task["entry_point"], task["test"], timeout=timeout,
                              helpers=prefix).passed


def task_rewards(tasks: list[dict], completions: list[str], timeout: float = 5.0, workers: int = 2) -> list[float]:
    """1.0 / 0.0 per (task, completion): exact answer for answer tasks, sandboxed tests for code tasks (run
    `workers` at a time: each waits on its own sandbox)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(pair):
        t, c = pair
        return float(code_passes(t, c, timeout) if "test" in t else exact_match(c, t["answer"]))

    pairs = list(zip(tasks, completions))
    if workers <= 1 or not any("test" in t for t in tasks):
        return [one(p) for p in pairs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, pairs))
