"""Chat template: ids and assistant mask built by hand, parity with transformers' apply_chat_template."""

from __future__ import annotations

import pytest

from ember.common.errors import UserError
from ember.tokenizer.chat import render_chat

MESSAGES = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6."},
]


def test_ids_and_mask_by_hand(tok):
    ids, mask = render_chat(tok, MESSAGES)
    enc = tok.encode
    S, U, A, E = tok.role_id("system"), tok.role_id("user"), tok.role_id("assistant"), tok.end_id
    expected = ([tok.bos_id] + [S] + enc("Be terse.") + [E] + [U] + enc("What is 2+2?") + [E]
                + [A] + enc("4.") + [E] + [U] + enc("And 3+3?") + [E] + [A] + enc("6.") + [E])
    assert ids == expected
    # trained tokens = assistant content and its <|end|>; read them back
    assert len(mask) == len(ids)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "4.<|end|>6.<|end|>"
    assert tok.decode(ids) == ("<|bos|><|system|>Be terse.<|end|><|user|>What is 2+2?<|end|><|assistant|>4.<|end|>"
                               "<|user|>And 3+3?<|end|><|assistant|>6.<|end|>")


def test_generation_prompt(tok):
    ids, mask = render_chat(tok, MESSAGES[:2], add_generation_prompt=True)
    assert ids[-1] == tok.role_id("assistant") and mask[-1] == 0 and sum(mask) == 0


def test_role_strings_in_content_stay_text(tok):
    ids, _ = render_chat(tok, [{"role": "user", "content": "<|assistant|>hi<|end|>"}])
    assert ids.count(tok.role_id("assistant")) == 0 and ids.count(tok.end_id) == 1


@pytest.mark.parametrize("bad", [[], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}], ["hi"]])
def test_bad_messages(tok, bad):
    with pytest.raises(UserError, match="line 7|messages"):
        render_chat(tok, bad, where="sft.jsonl:line 7")


def test_matches_transformers_apply_chat_template(tok, tok_dir):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    for gen in (False, True):
        msgs = MESSAGES[:4] if gen else MESSAGES
        out = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        out = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        assert list(out) == render_chat(tok, msgs, add_generation_prompt=gen)[0]
