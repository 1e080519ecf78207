"""Chat templates: Jinja rendering as transformers does it, and the (ids, assistant mask) of a rendered chat.

`render_text` builds the same sandboxed environment as transformers' `apply_chat_template` (trim_blocks,
lstrip_blocks, loopcontrols, its `tojson`, `raise_exception`, `strftime_now`), so the string is identical.
Where each message's content lies in the rendered string is found by rendering the chat once more with
sentinels in place of the contents (`locate_contents`); a content holding a special-token string is then
encoded as plain text (it cannot close a turn) and the rest with specials parsed, and each assistant reply +
the end-of-turn token closing it is marked as trained (any template; no role tokens assumed). A template that
transforms contents beyond stripping falls back to rendering each prefix of the chat (`assistant_spans`).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache

from ember.common.errors import UserError

# Used when a tokenizer has no template. A base model sees its messages as one document (today's serving
# fallback): [BOS] + contents joined by blank lines. A vocabulary with ChatML's tokens and no template gets
# ChatML (SmolLM2, Qwen), as serving did before templates were read from the tokenizer.
PLAIN_TEMPLATE = ("{{ bos_token if bos_token else '' }}{% for m in messages %}{{ m['content'] }}"
                  "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endfor %}")
CHATML_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_PROBE = "EMBER_PROBE_7f3a"  # an assistant reply whose closing text reveals the end-of-turn token
_TOKEN_LIKE = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?[A-Za-z_][\w.-]{0,30}>|\[/?[A-Z_]{2,20}\]")


class _TemplateError(Exception):
    """raise_exception() in a template, or any Jinja error; turned into a UserError by the caller."""


@lru_cache(maxsize=32)
def compile_template(source: str):
    """The compiled template in transformers' environment (sandboxed: templates come from downloaded files)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise _TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters (<, >, &); transformers' keeps them, so must we
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):  # no dunder attributes: they would reach CPython internals
        def __setitem__(self, name, value):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")
            super().__setitem__(name, value)

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} (transformers' assistant-mask markers) renders its body; ember
        derives the mask from the template itself, so the markers carry nothing more."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise _TemplateError(f"syntax error at template line {e.lineno}: {e.message}") from None


def render_text(source: str, messages: list[dict], add_generation_prompt: bool, tokens: dict, kwargs: dict) -> str:
    """The rendered chat; `tokens` holds bos_token/eos_token/pad_token/unk_token strings (absent ones left out)."""
    # as transformers: keys whose value is None are dropped (an API's content=None renders as a missing key)
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return compile_template(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               **{"tools": None, "documents": None, **tokens, **kwargs})
    except Exception as e:  # raise_exception, a Jinja error, or Python's own (str + int) inside the template
        raise _TemplateError(str(e) or type(e).__name__) from None


def validate_messages(messages, where: str, roles: tuple[str, ...] | None) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages, got {str(messages)[:80]!r}")
    for i, m in enumerate(messages):
        role_ok = isinstance(m, dict) and isinstance(m.get("role"), str) and (roles is None or m["role"] in roles)
        if not role_ok or not isinstance(m.get("content"), str):
            allowed = f"one of {', '.join(roles)}" if roles else "a string"
            raise UserError(f"{where}: message {i} = {str(m)[:80]!r} must be {{'role': {allowed}, "
                            f"'content': a string}}")


def specials_regex(specials) -> re.Pattern:
    """Any special-token string, longest first (so '<|im_end|>' wins over a shorter token it contains)."""
    alts = sorted(specials, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, alts)) if alts else "(?!)")


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def end_token(render, specials: dict, where: str) -> str | None:
    """The token string a template closes an assistant turn with: what it renders right after a reply.

    `render(messages, add_generation_prompt)` renders the template. None when the template writes no token
    there (or rejects both probe conversations); a UserError when it writes a token-like string ("<|eot_id|>")
    that is not a special token of the vocabulary, since such a template can never end a turn.
    """
    probes = ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}],
              [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": _PROBE}])
    for msgs in probes:
        try:
            text = render(msgs, False)
        except _TemplateError:
            continue
        if _PROBE not in text:
            continue
        after = text[text.rindex(_PROBE) + len(_PROBE):].lstrip()
        m = specials_regex(specials).match(after)
        if m:
            return m.group(0)
        m = _TOKEN_LIKE.match(after)
        if m:
            raise UserError(f"{where}: the chat template closes an assistant turn with {m.group(0)!r}, which is not "
                            f"a special token of this vocabulary; use the template that belongs to this tokenizer "
                            f"(tokenizer_config.json 'chat_template') or add {m.group(0)!r} as a special token")
        return None
    return None


_SENTINEL = re.compile("\ue000(\\d+)\ue001")  # private-use characters: no template or tokenizer gives them meaning


def locate_contents(render, messages: list[dict], add_generation_prompt: bool, rendered: str):
    """[(message index, start, end)] of every place `rendered` holds a message's content, or None when the
    template transforms contents in a way this cannot follow.

    The chat is rendered once more with each content replaced by a sentinel; the text between sentinels is the
    template's own. Substituting the contents back (or their stripped form, for templates that `| trim`) must
    give `rendered` exactly, so positions are known, never guessed by searching (a short reply such as "start"
    or "a" also occurs inside the template's `<|im_start|>` or `<|assistant|>`)."""
    marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    try:
        skeleton = render(marked, add_generation_prompt)
    except UserError:  # the template reads the contents (e.g. splits a reasoning block): not followable
        return None
    parts = _SENTINEL.split(skeleton)  # template text, index, template text, index, ..., template text
    for form in (lambda c: c, str.strip):
        out, places, pos = [], [], 0
        for k, part in enumerate(parts):
            if k % 2:
                i = int(part)
                if i >= len(messages):
                    return None
                content = form(messages[i]["content"])
                places.append((i, pos, pos + len(content)))
                part = content
            out.append(part)
            pos += len(part)
        if "".join(out) == rendered:
            return places
    return None


def chat_pieces(rendered: str, places, messages: list[dict], specials_re: re.Pattern, where: str):
    """[(start, end, protected)] covering `rendered`: protected pieces are message contents that hold (or
    touch) a special-token string, encoded as plain text; the rest is encoded in one pass with specials parsed
    (so the ids are transformers' wherever no content holds a special string). Without known content places,
    a conversation whose content holds a special-token string is refused: it could inject a control token."""
    if places is None:
        for i, m in enumerate(messages):
            hit = specials_re.search(m["content"])
            if hit:
                raise UserError(f"{where}: message {i} contains the special-token string {hit.group(0)!r} and the "
                                f"chat template transforms message contents, so it cannot be kept as plain text; "
                                f"remove it from the message")
        return [(0, len(rendered), False)]
    hits = [(m.start(), m.end()) for m in specials_re.finditer(rendered)]
    cuts = sorted((a, b) for _, a, b in places if a < b and any(s < b and e > a for s, e in hits))
    pieces, pos = [], 0
    for a, b in cuts:
        if a > pos:
            pieces.append((pos, a, False))
        pieces.append((a, b, True))
        pos = b
    if pos < len(rendered):
        pieces.append((pos, len(rendered), False))
    return pieces


def reply_spans(rendered: str, places, messages: list[dict], end: str | None) -> list[tuple[int, int]]:
    """Character spans an SFT loss trains on, from known content places: each assistant reply (where the
    template writes it last) and the end-of-turn token right after it (whitespace between allowed)."""
    spans = {}
    for i, a, b in places:
        if messages[i]["role"] == "assistant":
            tail = rendered[b:]
            if end and tail.lstrip().startswith(end):
                b += len(tail) - len(tail.lstrip()) + len(end)
            spans[i] = (a, b)
    return sorted(spans.values())


def assistant_spans(render, rendered: str, messages: list[dict], end: str | None) -> list[tuple[int, int]]:
    """Character spans of `rendered` that an SFT loss trains on: each assistant reply and its end-of-turn token.

    For reply i: the chat up to it with the generation prompt, and up to it with the reply, share a prefix;
    what the second adds is the reply as the template writes it, trailing whitespace after the end token
    dropped. Templates that render earlier turns differently in a longer chat are searched for the same text.
    """
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:i], True), render(messages[:i + 1], False)
        a = common_prefix(before, upto)
        text = upto[a:].rstrip()
        # whitespace the template puts before the reply (a separator) is context, the reply's own is not
        lead = (len(text) - len(text.lstrip())) - (len(m["content"]) - len(m["content"].lstrip()))
        if lead > 0:
            a, text = a + lead, text[lead:]
        if not text:
            continue
        if rendered.startswith(upto[:a + len(text)]) and a >= cursor:
            at = a
        else:
            at = rendered.find(text, cursor)
        if at < 0:  # the reply is written differently in context: train on its content (+ the end token)
            at = rendered.find(m["content"], cursor)
            if at < 0 or not m["content"]:
                continue
            text = m["content"]
            tail = rendered[at + len(text):]
            if end and tail.startswith(end):
                text += end
        spans.append((at, at + len(text)))
        cursor = at + len(text)
    return spans
