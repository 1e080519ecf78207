"""Task formats: loaders on the real benchmark files (item counts), scoring on hand-made items with models
whose outputs are known (a uniform model for multiple choice, a scripted one for generation)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ember.common.errors import UserError
from ember.eval.scoring import EvalLM
from ember.eval.tasks import Options, arc, get, gsm8k, hellaswag, humaneval, mmlu, multiple_choice, perplexity, reference

from .conftest import ASSETS, ByteTokenizer, close, datasets_or_skip, fixed_lm


class Uniform:
    """Every token has probability 1/V."""

    def __call__(self, idx):
        return torch.zeros(*idx.shape, 258)


class Scripted:
    """Generates a fixed continuation: for a row whose text is a prefix of one of `texts`, the next byte of
    that text gets all the mass (EOS once the text is done). Only generation is meaningful."""

    def __init__(self, texts: list[str]):
        self.texts = [t.encode() for t in texts]

    def __call__(self, idx):
        last = torch.full((idx.shape[0], 1, 258), -30.0)
        for r, row in enumerate(idx.tolist()):
            prefix = bytes(i for i in row if i < 256)
            nxt = next((t[len(prefix)] if len(t) > len(prefix) else 257 for t in self.texts if t.startswith(prefix)), 257)
            last[r, 0, nxt] = 30.0
        return last.expand(-1, idx.shape[1], -1)  # (B, T, V); only the last position is read when generating


def scripted_lm(texts):
    return fixed_lm(Scripted(texts), 4096, stop_ids=(257,))


@pytest.mark.parametrize("loader,parts,count", [
    (hellaswag.load, ("hellaswag", "hellaswag_val_lmeval_preprocessed.jsonl.gz"), 10042),
    (arc.load, ("arc", "ARC-Easy-Test.jsonl"), 2376),
    (arc.load, ("arc", "ARC-Challenge-Test.jsonl"), 1172),
    (arc.load, ("arc", "ARC-Challenge-Train.jsonl"), 1119),
    (mmlu.load, ("mmlu", "test"), 14042),
    (mmlu.load, ("mmlu", "dev"), 285),
    (gsm8k.load, ("gsm8k", "test.jsonl"), 1319),
    (humaneval.load, ("humaneval", "HumanEval.jsonl.gz"), 164),
    (reference.load, ("alpaca_eval", "alpaca_eval.jsonl"), 805),
])
def test_loaders_read_the_real_files(loader, parts, count):
    items = loader(datasets_or_skip(*parts))
    assert len(items) == count
    assert len({it["id"] for it in items}) == count  # ids are unique (few-shot exclusion and contamination use them)
    if "choices" in items[0]:
        assert all(0 <= it["gold"] < len(it["choices"]) for it in items)


def test_real_item_formats():
    hs = hellaswag.load(datasets_or_skip("hellaswag", "hellaswag_val_lmeval_preprocessed.jsonl.gz"))[0]
    assert hs["context"] == "Roof shingle removal: A man is sitting on a roof. he" and hs["gold"] == 3
    ch = arc.load(datasets_or_skip("arc", "ARC-Challenge-Test.jsonl"))
    assert any(len(it["choices"]) != 4 for it in ch)  # 3- and 5-choice items are kept
    mm = mmlu.load(datasets_or_skip("mmlu", "test"))[0]
    assert mm["subject"] == "abstract_algebra" and mm["context"].endswith("\nD. 6\nAnswer:") and mm["gold"] == 1
    g = gsm8k.load(datasets_or_skip("gsm8k", "test.jsonl"))[0]
    assert g["target"] == "18"


def test_hellaswag_original_format_fixture():
    items = hellaswag.load(ASSETS / "hellaswag_rowanz_format.jsonl")
    assert [it["id"] for it in items] == ["4", "9", "12"]
    assert items[0]["context"] == "Making a sandwich: A man lays two slices of bread on a plate. He"
    assert items[0]["choices"][2] == "starts to. sing loudly."  # " [title]" -> ". " as lm-evaluation-harness
    assert items[1]["choices"][3] == "reads a book."


def test_hellaswag_rowanz_rows_with_ctx_too_use_the_split(tmp_path):
    """Real rowanz rows carry ctx (ctx_a + " " + ctx_b, lowercase) beside ctx_a/ctx_b: lm-eval's prompt
    capitalizes ctx_b, so ctx_a/ctx_b win; a ctx-only row is used as written."""
    row = {"ind": 1, "activity_label": "Roofing", "ctx_a": "A man is on a roof.", "ctx_b": "he", "endings": ["a", "b"],
           "ctx": "A man is on a roof. he", "label": 0}
    f = tmp_path / "h.jsonl"
    f.write_text(json.dumps(row) + "\n" + json.dumps({k: v for k, v in row.items() if k not in ("ctx_a", "ctx_b")}) + "\n")
    assert [it["context"] for it in hellaswag.load(f)] == ["Roofing: A man is on a roof. He", "Roofing: A man is on a roof. he"]


def test_multiple_choice_raw_vs_length_normalized_by_hand():
    # Uniform model: log p(" " + c) = -(len(c) + 1) ln 258. Raw picks the shortest choice; divided by
    # len(c), -(1 + 1/len) ln 258 is largest for the longest choice.
    items = [{"id": "0", "context": "Q", "choices": ["ab", "abcdef", "abc"], "gold": 0},
             {"id": "1", "context": "Q", "choices": ["ab", "abcdef", "abc"], "gold": 1}]
    lm = EvalLM(fn=Uniform(), tokenizer=ByteTokenizer(), max_len=64)
    s = multiple_choice.run(lm, items, items, 0, Options())
    assert list(s.cols["acc"]) == [1.0, 0.0] and list(s.cols["acc_norm"]) == [0.0, 1.0]
    assert close(s.samples[0]["loglik"][1], -7 * math.log(258))


def test_fewshot_prompt_layout_and_exclusion():
    pool = [{"id": str(i), "context": f"Q{i}?", "choices": ["x", "y"], "gold": i % 2} for i in range(4)]
    p = multiple_choice.prompt(pool[0], [pool[1], pool[2]])
    assert p == "Q1? y\n\nQ2? x\n\nQ0?"
    import random
    from ember.eval.tasks.common import draw_fewshot
    for seed in range(20):
        shots = draw_fewshot(pool, 3, random.Random(seed), exclude="2")
        assert len(shots) == 3 and all(s["id"] != "2" for s in shots)


def test_mmlu_fewshot_uses_first_dev_items_of_same_subject():
    dev = mmlu.load(datasets_or_skip("mmlu", "dev"))
    test = mmlu.load(datasets_or_skip("mmlu", "test"))
    item = next(it for it in test if it["subject"] == "astronomy")
    from ember.eval.tasks.common import draw_fewshot
    import random
    shots = draw_fewshot(dev, 5, random.Random(0), group_key="subject", group="astronomy", first=True)
    assert [s["id"] for s in shots] == [f"astronomy/{i}" for i in range(5)]
    p = multiple_choice.prompt(item, shots)
    assert p.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n")
    assert p.count("\nAnswer:") == 6


def test_a_separate_pool_item_with_the_same_id_still_counts():
    """MMLU's dev and test rows are both numbered subject/0, subject/1, ...: test item s/0 gets all 5 dev shots
    (the exclusion of 'the item itself' only applies when the pool is the eval set)."""
    class Recorder:
        def loglikelihood_text(self, pairs):
            self.contexts = [c for c, _ in pairs]
            return [(0.0, False)] * len(pairs)

    def q(i):
        return {"id": f"s/{i}", "subject": "s", "description": "", "context": f"Q{i}\nAnswer:", "choices": ["A", "B"],
                "gold": 0}

    lm, items = Recorder(), [q(0)]
    multiple_choice.run(lm, items, [q(i) for i in range(5)], 5, Options(), first_n=True)  # 5 dev rows s/0..s/4
    assert lm.contexts[0].count("\nAnswer:") == 6  # 5 shots + the question
    both = [q(0), q(1)]
    multiple_choice.run(lm, both, both, 5, Options(), first_n=True)  # pool = the eval set: never the item itself
    assert lm.contexts[0].count("\nAnswer:") == 2 and lm.contexts[0].count("Q0") == 1


def test_gsm8k_extraction():
    assert gsm8k.extract_strict("so 5 + 2 = 7\n#### 1,234") == "1234"
    # lm-eval's normalization drops ",", "$" and a final "." and compares strings: "1050.00" is not "1050"
    assert gsm8k.extract_flex("She pays $1,050.00 in total.") == "1050.00"
    assert gsm8k.extract_flex("so x = -3, and the answer is 18.") == "18"
    assert gsm8k.extract_flex("no number") is None and gsm8k.extract_strict("7") is None
    assert gsm8k.normalize("3.50") == "3.50" and gsm8k.normalize("$1,234.") == "1234"


def test_mmlu_answer_must_be_one_letter(tmp_path):
    for bad in ("", "BC"):
        f = tmp_path / "x_test.csv"
        f.write_text(f"What?,a,b,c,d,{bad}\n")
        with pytest.raises(UserError, match=r"x_test.csv:1: expected question,A,B,C,D,answer with answer in A-D"):
            mmlu.load(f)


def test_gsm8k_answer_without_final_number_is_refused(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text('{"question": "2+2?", "answer": "2+2 = 4\\n#### 4"}\n\n{"question": "3+3?", "answer": "It is 6"}\n')
    with pytest.raises(UserError, match=r"g.jsonl:3: the answer has no final '#### <number>' line"):  # file line
        gsm8k.load(f)


def test_task_files_from_parquet_and_hf(tmp_path):
    """A task reads Parquet and hf: sources (a local folder here) as it reads JSONL; errors name the row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pytest.importorskip("datasets")
    rows = [{"question": "2+2?", "answer": "2+2 = 4\n#### 4"}, {"question": "3+3?", "answer": "It is 6"}]
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "g.parquet")
    assert [it["target"] for it in gsm8k.load(tmp_path / "g.parquet")] == ["4"]
    (tmp_path / "gsm").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "gsm" / "test.parquet")
    items = gsm8k.load(f"hf:{tmp_path / 'gsm'}:test")
    assert [(it["question"], it["target"]) for it in items] == [("2+2?", "4")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gsm" / "test.parquet")
    with pytest.raises(UserError, match=r"hf:.*gsm\[test\]#1: the answer has no final"):
        gsm8k.load(f"hf:{tmp_path / 'gsm'}:test")
    pq.write_table(pa.Table.from_pylist([{"text": "hello world"}]), tmp_path / "gsm" / "test.parquet")
    assert [it["text"] for it in perplexity.load(f"hf:{tmp_path / 'gsm'}:test")] == ["hello world"]


def test_gsm8k_generation_exact_match_with_scripted_model():
    items = gsm8k.load(ASSETS / "gsm8k_tiny.jsonl")
    right = gsm8k.prompt(items[0], []) + " 3 + 4 = 7\n#### 7\n\nQuestion: next"
    wrong = gsm8k.prompt(items[1], []) + " It is 1,000 pens.\n#### 1000"
    s = gsm8k.run(scripted_lm([right, wrong]), items, items, 0, Options(max_new_tokens=40))
    assert list(s.cols["exact_match_strict"]) == [1.0, 0.0] and list(s.cols["exact_match_flex"]) == [1.0, 0.0]
    assert s.samples[0]["output"] == " 3 + 4 = 7\n#### 7"  # cut at the blank line


def test_humaneval_pass_at_k_with_scripted_completions():
    items = humaneval.load(datasets_or_skip("humaneval", "HumanEval.jsonl.gz"))[:3]
    texts = [items[0]["prompt"] + items[0]["canonical_solution"] + "\ndef extra():\n",
             items[1]["prompt"] + "    return []\n",
             items[2]["prompt"] + items[2]["canonical_solution"]]
    s = humaneval.run(scripted_lm(texts), items, [], 0, Options(max_new_tokens=400, n_samples=2, ks=(1, 2)))
    assert list(s.cols["pass@1"]) == [1.0, 0.0, 1.0] and list(s.cols["pass@2"]) == [1.0, 0.0, 1.0]
    assert s.samples[0]["status"] == ["passed", "passed"]


def test_perplexity_and_bits_per_byte_by_hand(bigram, tmp_path):
    (tmp_path / "held.jsonl").write_text('{"text": "hello world"}\n{"text": "abc"}\n')
    items = perplexity.load(tmp_path / "held.jsonl")
    lm = EvalLM(fn=bigram, tokenizer=ByteTokenizer(), max_len=4)  # several windows per document
    s = perplexity.run(lm, items, [], 0, Options())
    nll = 0.0
    for t in ("hello world", "abc"):
        ids = [256] + list(t.encode())
        nll -= sum(bigram.logp(ids[i - 1], ids[i]) for i in range(1, len(ids)))
    m = s.stat(s.cols)
    assert close(m["nll_per_token"], nll / 14) and close(m["perplexity"], math.exp(nll / 14))
    assert close(m["bits_per_byte"], nll / math.log(2) / 14)


def test_perplexity_text_file_chunks(tmp_path):
    p = tmp_path / "book.txt"
    text = "\n\n".join(f"paragraph {i} " * 40 for i in range(30)) + "\n" + "\n".join(["code line"] * 900)
    p.write_text(text)
    items = perplexity.load(p)
    assert len(items) > 3 and "".join(it["text"] for it in items) == text  # lossless cut
    assert all(len(it["text"]) <= perplexity.CHUNK_CHARS for it in items)
    assert all(it["text"].endswith("\n\n") for it in items[:2])  # cut after a blank line where possible


def test_reference_task_bleu_rouge_with_scripted_model():
    items = reference.load(ASSETS / "reference_tiny.jsonl")
    lm = scripted_lm(["Name a primary color.\n\nRed is a primary color.\n\nmore", "What do bees make?\n\nHoney."])
    s = reference.run(lm, items, [], 0, Options(max_new_tokens=40))
    m = s.stat(s.cols)
    assert s.samples[0]["output"] == "Red is a primary color."
    assert list(s.cols["rouge1"]) == [1.0, pytest.approx(0.5)]  # "honey" vs "bees make honey": P 1, R 1/3
    assert 0 < m["bleu"] < 100


def test_bad_inputs_are_user_errors(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\nnot json\n')
    with pytest.raises(UserError, match=r"x.jsonl:2"):
        gsm8k.load(bad)
    with pytest.raises(UserError, match="unknown eval task 'hellaswg'.*hellaswag"):
        get("hellaswg")
