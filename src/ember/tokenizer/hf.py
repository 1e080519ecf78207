"""HF `tokenizers` backend (ember's trained tokenizer.json, any HF tokenizer.json, GGUF "gpt2" vocabularies),
and the settings transformers keeps beside a tokenizer.json (tokenizer_config.json, special_tokens_map.json,
generation_config.json, chat_template.jinja).

Two working copies of the tokenizer: one parses special-token strings, one (`encode_special_tokens=True`)
keeps them as text. A per-call flag on one shared object would race when the server encodes from several
threads. Neither runs the file's post-processor: BOS is added by ember's code (`encode_prompt`), never twice.
"""

from __future__ import annotations

import json
from pathlib import Path

from ember.common.errors import UserError
from ember.tokenizer.special import no_lone_surrogates


class HFBackend:
    kind = "hf"

    def __init__(self, hf):
        from tokenizers import Tokenizer as HFTokenizer

        self.hf = hf  # the tokenizer as its file defines it (saved and exported as is)
        spec = hf.to_str()
        self._parse, self._plain = HFTokenizer.from_str(spec), HFTokenizer.from_str(spec)
        for t in (self._parse, self._plain):
            t.post_processor = None  # add_special_tokens=False skips BOS; this also keeps offsets untrimmed
        self._plain.encode_special_tokens = True
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.special = {t.content: i for i, t in sorted(hf.get_added_tokens_decoder().items()) if t.special}
        self.unk_id = None
        model = json.loads(spec).get("model", {})
        if model.get("unk_token") is not None:
            self.unk_id = hf.token_to_id(model["unk_token"])
        self._newline = self._plain.encode("\n", add_special_tokens=False).ids

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    def encode(self, text: str, special: bool = False, start: bool = True) -> list[int]:
        return self.encode_offsets(text, special, start)[0]

    def encode_offsets(self, text: str, special: bool, start: bool = True) -> tuple[list[int], list[int]]:
        """(ids, start character of each token). start=False: `text` continues an earlier piece, so it is
        encoded after a newline that is then dropped (no SentencePiece-style prefix space at a piece's start:
        transformers' `_encode_chat_piece` trick), unless the newline merged into the text's first token."""
        t = self._parse if special else self._plain
        text = no_lone_surrogates(text)
        if not start and self._newline:
            e = t.encode("\n" + text, add_special_tokens=False)
            n = len(self._newline)
            if e.ids[:n] == self._newline:
                return e.ids[n:], [max(0, s - 1) for s, _ in e.offsets[n:]]
        e = t.encode(text, add_special_tokens=False)
        return e.ids, [s for s, _ in e.offsets]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once, in parallel on all cores (tokenizers' Rust thread pool)."""
        batch = getattr(self._plain, "encode_batch_fast", self._plain.encode_batch)  # _fast (no offsets) since 0.21
        return [e.ids for e in batch([no_lone_surrogates(t) for t in texts], add_special_tokens=False)]

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)


def load_hf_file(path: Path):
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise UserError(f"{path}: not a readable tokenizer.json ({e}). Point at the tokenizer.json of a trained "
                        f"tokenizer (`ember tokenizer`) or an HF model folder.") from None


def read_settings(path: Path) -> dict:
    """A settings file beside a tokenizer (tokenizer_config.json, ...) as a dict; {} when absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); fix or delete the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds a JSON {type(data).__name__}, not an object of settings; fix or delete the "
                        f"file")
    return data


def _token_str(v, where: Path, key: str) -> str | None:
    """tokenizer_config.json writes a token as a string or as an AddedToken dict {"content": ...}."""
    s = v.get("content") if isinstance(v, dict) else v
    if v is not None and not isinstance(s, str):
        raise UserError(f"{where}: {key} is {json.dumps(v)[:80]}; it must be the token's text (a string), an AddedToken object "
                        f"{{\"content\": \"...\"}} or null. Fix or delete the entry")
    return s


def _chat_template(v, where: Path) -> str | None:
    """tokenizer_config.json's chat_template: one Jinja string, or [{"name": ..., "template": ...}, ...] of which
    "default" is the chat template (transformers' multi-template form); None when it names none."""
    must = ('must be a Jinja string or a list of {"name": ..., "template": "<Jinja string>"} objects, one named '
            '"default"')
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                   and isinstance(t.get("template"), str) for t in v):
        default = [t["template"] for t in v if t["name"] == "default"]
        if default:
            return default[0]
        raise UserError(f"{where}: chat_template lists {[t['name'] for t in v]} but no \"default\" one; a "
                        f"chat_template {must}. Fix the entry")
    raise UserError(f"{where}: chat_template is {json.dumps(v)[:80]}; a chat_template {must}. Fix or delete the entry")


def _stop_ids(v, where: Path, vocab_size: int) -> tuple[int, ...]:
    """generation_config.json's eos_token_id: one token id or a list of them, each in [0, vocab_size)."""
    ids = v if isinstance(v, list) else [v]
    bad = [i for i in ids if type(i) is not int or not 0 <= i < vocab_size]  # bool is not an id (json true)
    if bad:
        what = f"holds {json.dumps(bad[0])[:40]}" if isinstance(v, list) else "is not a token id"
        raise UserError(f"{where}: eos_token_id {json.dumps(v)[:80]} {what}; it must be a token id (an integer in "
                        f"[0, {vocab_size})) or a list of them. Fix or delete the entry")
    return tuple(ids)


# Llama-2/Mistral, GPT-2/SmolLM/Qwen, Llama-3, Gemma, ember-style names; the first that is a special token wins
GUESSES = {"eos": ("</s>", "endoftext", "end_of_text", "eos"), "bos": ("<s>", "begin_of_text", "bos"), "pad": ("pad",)}


def folder_settings(path: Path, hf) -> dict:
    """What transformers reads beside a tokenizer.json: special token strings, add_bos, chat template,
    generation_config's eos ids; keys absent when the files do not say."""
    folder = path.parent
    files = [folder / "special_tokens_map.json", folder / "tokenizer_config.json"]  # the later one wins
    cfg, source = {}, {}  # setting -> value, setting -> the file that gave it
    for f in files:
        data = read_settings(f)
        cfg.update(data)
        source.update(dict.fromkeys(data, f))
    out: dict = {}
    for key in ("bos", "eos", "pad", "unk"):
        name = f"{key}_token"
        s = _token_str(cfg.get(name), source.get(name), name)
        if s is not None and hf.token_to_id(s) is None:  # dropping it would leave e.g. a template's bos undefined
            raise UserError(f"{source[name]}: {name} {s!r} is not a token of {path} (its vocabulary has no such "
                            f"entry); name one of its tokens, or delete the entry")
        if s is not None:
            out[key] = s
    template = _chat_template(cfg.get("chat_template"), source.get("chat_template"))
    jinja_file = folder / "chat_template.jinja"  # transformers >= 4.43 saves the template here
    if jinja_file.is_file():
        try:
            template = jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{jinja_file}: not a readable UTF-8 Jinja template ({e}); fix or delete the file") \
                from None
    if template is not None:
        out["chat_template"] = template
    proc = json.loads(hf.to_str()).get("post_processor")
    if "bos" not in out:  # a bare tokenizer.json (Llama-2's) still names its BOS in the post-processor
        first = _first_special(proc)
        if first is not None and hf.token_to_id(first) is not None:
            out["bos"] = first
    # a bare tokenizer.json names no EOS/BOS/PAD: find them among its special tokens by the families' usual names
    specials = [t["content"] for t in json.loads(hf.to_str()).get("added_tokens", []) if t.get("special")]
    for key, names in GUESSES.items():
        if key not in out:
            found = next((t for name in names for t in specials if t == name or t.strip("<|>").lower() == name), None)
            if found is not None:
                out[key] = found
    add_bos = cfg.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise UserError(f"{source['add_bos_token']}: add_bos_token is {json.dumps(add_bos)[:80]}; it must be true, false or null. "
                        f"Fix or delete the entry")
    if add_bos is not None:
        out["add_bos"] = add_bos
    else:
        out["add_bos"] = out.get("bos") is not None and _first_special(proc) == out["bos"]
    gen_file = folder / "generation_config.json"
    gen = read_settings(gen_file).get("eos_token_id")
    if gen is not None:
        out["extra_stop_ids"] = _stop_ids(gen, gen_file, hf.get_vocab_size(with_added_tokens=True))
    return out


def _first_special(proc) -> str | None:
    """The special token a tokenizer.json post_processor puts first (TemplateProcessing, possibly inside a
    Sequence; Roberta/Bert's cls), i.e. the BOS that `tokenizer(text)` adds; None when it adds none."""
    if not isinstance(proc, dict):
        return None
    if proc.get("type") == "Sequence":
        return next((t for p in proc.get("processors", []) if (t := _first_special(p)) is not None), None)
    if proc.get("type") == "TemplateProcessing":
        single = proc.get("single") or [{}]
        return single[0].get("SpecialToken", {}).get("id")
    if proc.get("type") in ("RobertaProcessing", "BertProcessing"):
        return (proc.get("cls") or [None])[0]
    return None


def with_bos_processor(spec: dict, bos: str | None, bos_id: int | None, add_bos: bool) -> dict:
    """tokenizer.json whose post-processor adds BOS exactly when add_bos (what transformers and vLLM read),
    in the layout transformers' own `update_post_processor` writes; other processors (ByteLevel) are kept."""
    proc = spec.get("post_processor")
    kept = [p for p in (proc.get("processors", []) if proc and proc.get("type") == "Sequence" else [proc])
            if p and p.get("type") not in ("TemplateProcessing", "RobertaProcessing", "BertProcessing")]
    if add_bos:
        b = {"SpecialToken": {"id": bos, "type_id": 0}}
        kept.append({"type": "TemplateProcessing",
                     "single": [b, {"Sequence": {"id": "A", "type_id": 0}}],
                     "pair": [b, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": bos, "type_id": 1}},
                              {"Sequence": {"id": "B", "type_id": 1}}],
                     "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}})
    spec = dict(spec)
    spec["post_processor"] = (None if not kept else kept[0] if len(kept) == 1
                              else {"type": "Sequence", "processors": kept})
    return spec
