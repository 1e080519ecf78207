"""Chat template: a list of {"role", "content"} messages -> token ids and an assistant-token mask.

    <|bos|><|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>
                                                                         ^^^^^^^^^^^^ mask = 1

The mask marks the tokens an SFT loss trains on: each assistant reply and its closing <|end|> (so the
model learns to stop); role tokens, system and user text are context only. CHAT_TEMPLATE is the same
format as a Jinja template, saved in tokenizer_config.json for transformers' apply_chat_template.
"""

from __future__ import annotations

from ember.common.errors import UserError
from ember.tokenizer.special import ASSISTANT, BOS, END, ROLE_TOKENS, Tokenizer

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)
assert BOS == "<|bos|>" and END == "<|end|>" and all(t == f"<|{r}|>" for r, t in ROLE_TOKENS.items())


def render_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False,
                where: str = "messages") -> tuple[list[int], list[int]]:
    """(ids, mask) of equal length; add_generation_prompt appends <|assistant|> for the model to answer.

    `where` names the conversation in error messages (e.g. "sft.jsonl:12").
    """
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages")
    ids, mask = [tok.bos_id], [0]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLE_TOKENS or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {i} = {str(m)[:80]!r} must be {{'role': one of "
                            f"{', '.join(ROLE_TOKENS)}, 'content': a string}}")
        content = tok.encode(m["content"])
        train = 1 if m["role"] == "assistant" else 0
        ids += [tok.role_id(m["role"])] + content + [tok.end_id]
        mask += [0] + [train] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(tok.role_id("assistant"))
        mask.append(0)
    return ids, mask
