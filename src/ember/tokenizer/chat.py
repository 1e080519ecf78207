"""ember's chat template, and `render_chat(tok, messages)` for callers that predate `Tokenizer.render_chat`.

    <|bos|><|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>
                                                                         ^^^^^^^^^^^^ mask = 1

The mask marks the tokens an SFT loss trains on: each assistant reply and its closing <|end|> (so the
model learns to stop); role tokens, system and user text are context only. Any tokenizer renders with its
own template (tokenizer/template.py derives the mask from it); CHAT_TEMPLATE is ember's, also saved in
tokenizer_config.json for transformers' apply_chat_template.
"""

from __future__ import annotations

from ember.tokenizer.special import ASSISTANT, BOS, END, ROLE_TOKENS

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)
assert BOS == "<|bos|>" and END == "<|end|>" and all(t == f"<|{r}|>" for r, t in ROLE_TOKENS.items())


def render_chat(tok, messages: list[dict], add_generation_prompt: bool = False,
                where: str = "messages") -> tuple[list[int], list[int]]:
    """(ids, mask) of equal length: `tok.render_chat` (the tokenizer's own template); add_generation_prompt
    appends what the template opens an assistant turn with. `where` names the conversation in errors."""
    return tok.render_chat(messages, add_generation_prompt=add_generation_prompt, where=where)
