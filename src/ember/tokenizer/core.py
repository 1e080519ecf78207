"""The one Tokenizer every stage uses, over pluggable backends: HF `tokenizers` (ember's trained BPE, any HF
tokenizer.json, GGUF "gpt2" vocabularies) and SentencePiece (llama2.c tok*.bin, GGUF "llama").

    tok = load_tokenizer("runs/demo/tokenizer")        # a tokenizer.json, its folder, or a llama2.c tok*.bin
    tok = Tokenizer.from_gguf(metadata)                 # the tokenizer inside a GGUF file (None if it has none)
    ids, mask = tok.render_chat(messages)               # the model's own chat template + the SFT loss mask
    tok.save("out/hf")                                  # loadable here and by transformers' AutoTokenizer

`encode(text)` keeps special-token strings as text (a document or a user typing "<|im_end|>" cannot close a
turn); `encode(text, special=True)` parses them, as vLLM and llama.cpp do for raw completion prompts.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ember.common import artifacts
from ember.common.errors import UserError
from ember.tokenizer.chat import CHAT_TEMPLATE
from ember.tokenizer.special import (BOS, END, EOS, PAD, ROLE_TOKENS, SPECIAL_TOKENS, SPLIT_PATTERN, byte_decoder,
                                     sha256_file)
from ember.tokenizer.template import (CHATML_TEMPLATE, PLAIN_TEMPLATE, _TemplateError, assistant_spans, chat_pieces,
                                      compile_template, end_token, locate_contents, render_text, reply_spans, specials_regex,
                                      validate_messages)


class Tokenizer:
    """Text <-> ids, special tokens, and chat rendering for any backend (see the module doc).

    `backend`: an HFBackend, a SentencePiece, or a bare tokenizers.Tokenizer (wrapped). Token settings
    (bos, eos, pad, unk, end) are token strings or ids; a vocabulary holding all of ember's special tokens
    is ember's own (kind "ember": its BOS/EOS/PAD/<|end|>, CHAT_TEMPLATE, BOS before every document).
    `extra_stop_ids`: more ids that end generation (generation_config.json's eos_token_id list).
    """

    def __init__(self, backend, path: str | Path | None = None, *, bos=None, eos=None, pad=None, unk=None,
                 end=None, chat_template: str | None = None, add_bos: bool | None = None,
                 extra_stop_ids=(), sha256: str | None = None, kind: str | None = None):
        if not hasattr(backend, "encode_offsets"):  # a tokenizers.Tokenizer, as `ember tokenizer` trains it
            from ember.tokenizer.hf import HFBackend

            backend = HFBackend(backend)
        self.backend = backend
        self.path = Path(path) if path is not None else None
        self.hf = getattr(backend, "hf", None)  # the tokenizers.Tokenizer of an HF backend, else None
        self.vocab_size = backend.vocab_size
        self.ids = dict(backend.special)  # special token string -> id
        self.roles = None  # allowed message roles; None = any string the template accepts
        if kind in (None, "ember") and all(t in self.ids for t in SPECIAL_TOKENS):
            kind, bos, eos, pad, end = "ember", BOS, EOS, PAD, END
            add_bos = True  # ember trains and serves every document/chat after BOS (old configs said False)
            chat_template = chat_template or CHAT_TEMPLATE
            self.ids = {**{t: self.ids[t] for t in SPECIAL_TOKENS}, **self.ids}
            self.roles = tuple(ROLE_TOKENS)
        self.kind = kind or backend.kind
        self.bos_id, self.eos_id = self._id(bos), self._id(eos)
        self.unk_id = self._id(unk) if unk is not None else backend.unk_id
        pad_id = self._id(pad)
        self.pad_id = pad_id if pad_id is not None else self.eos_id if self.eos_id is not None else 0
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.chat_template = chat_template
        if chat_template is None and {"<|im_start|>", "<|im_end|>"} <= self.ids.keys():
            self._template = CHATML_TEMPLATE  # a vocabulary made for ChatML: serving always rendered it so
        else:
            self._template = chat_template or PLAIN_TEMPLATE
        try:  # a template that cannot even compile is the file's fault, not a conversation's: say so at load
            compile_template(self._template)
        except _TemplateError as e:
            raise UserError(f"{self._name}: its chat_template does not compile ({e}); fix the template in the "
                            f"tokenizer's files (tokenizer_config.json, chat_template.jinja or the GGUF's "
                            f"tokenizer.chat_template)") from None
        self._specials_re, self._special_ids = specials_regex(self.ids), set(self.ids.values())
        if sha256 is None:
            sha256 = (sha256_file(self.path) if self.path is not None and self.path.is_file()
                      else hashlib.sha256(self._serialized()).hexdigest())
        self.sha256 = sha256
        self.end_id = None  # the end-of-turn token closing an assistant turn in the template
        if self._template is not PLAIN_TEMPLATE:
            s = end_token(lambda m, g: self._render(m, g, {}), self.ids, self._name)
            self.end_id = self.ids[s] if s is not None else None
        if self.end_id is None and end is not None and self._template is not PLAIN_TEMPLATE:
            self.end_id = self._id(end)  # GGUF's eot id when the template shows none
        self.end_token = self.id_to_token(self.end_id) if self.end_id is not None else None
        self.stop_ids = tuple(dict.fromkeys(i for i in (self.eos_id, self.end_id, *extra_stop_ids) if i is not None))

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, vocab_size: int | None = None) -> "Tokenizer":
        return load_tokenizer(path, vocab_size)

    @classmethod
    def from_gguf(cls, metadata: dict) -> "Tokenizer | None":
        """The tokenizer in GGUF metadata (key -> value, as gguf readers give it), or None when it has none."""
        from ember.tokenizer.gguf import gguf_backend

        found = gguf_backend(metadata)
        return None if found is None else cls(found[0], **found[1])

    def _id(self, token) -> int | None:
        """A token string or id -> its id; None when absent from the vocabulary."""
        if token is None:
            return None
        if isinstance(token, int):
            return token if 0 <= token < self.vocab_size else None
        return self.backend.token_to_id(token)

    @property
    def _name(self) -> str:
        return str(self.path) if self.path is not None else f"the {self.kind} tokenizer"

    def _serialized(self) -> bytes:
        return self.hf.to_str().encode() if self.hf is not None else self.backend.llama2c_bytes()

    # ------------------------------------------------------------------ text
    def encode(self, text: str, special: bool = False) -> list[int]:
        """Ids of `text`; special-token strings in it stay text unless special=True. No BOS (see encode_prompt)."""
        return self.backend.encode(text, special)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of many texts (special-token strings as text), in parallel where the backend can."""
        return self.backend.encode_batch(texts)

    def encode_prompt(self, text: str) -> list[int]:
        """A raw completion prompt: BOS when the model expects one, then the text with specials parsed."""
        return ([self.bos_id] if self.add_bos else []) + self.encode(text, special=True)

    def decode(self, ids, skip_special: bool = False) -> str:
        """Ids back to text; special tokens written as their names ("<|end|>") unless skip_special."""
        return self.backend.decode(list(ids), skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def role_id(self, role: str) -> int:
        """ember's role token id ("user" -> <|user|>); only ember's vocabulary has role tokens."""
        if role not in ROLE_TOKENS or ROLE_TOKENS[role] not in self.ids:
            raise UserError(f"role {role!r}: {self._name} has no role tokens (only ember's tokenizer does); "
                            f"render chats with tok.render_chat(messages), which uses the model's own template")
        return self.ids[ROLE_TOKENS[role]]

    # ------------------------------------------------------------------ chat
    def _tokens(self) -> dict:
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id,
                 "unk_token": self.unk_id}
        return {k: self.id_to_token(i) for k, i in names.items() if i is not None}

    def _render(self, messages: list[dict], add_generation_prompt: bool, kwargs: dict) -> str:
        return render_text(self._template, messages, add_generation_prompt, self._tokens(), kwargs)

    def _user_render(self, where: str, kwargs: dict):
        def render(messages, add_generation_prompt):
            try:
                return self._render(messages, add_generation_prompt, kwargs)
            except _TemplateError as e:
                raise UserError(f"{where}: the chat template of {self._name} rejected the messages: {e}. Fix the "
                                f"conversation (roles, order) or use a tokenizer whose template accepts it") from None
        return render

    def render_chat_text(self, messages: list[dict], add_generation_prompt: bool = False, where: str = "messages",
                         **kwargs) -> str:
        """The string transformers' apply_chat_template(messages, tokenize=False) gives for this template.

        No template: a vocabulary with <|im_start|>/<|im_end|> renders ChatML, any other (a base model) its
        messages as one document, [BOS] + contents joined by blank lines."""
        validate_messages(messages, where, self.roles)
        return self._user_render(where, kwargs)(messages, add_generation_prompt)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False, where: str = "messages",
                    **kwargs) -> tuple[list[int], list[int]]:
        """(ids, mask) of equal length for render_chat_text's string: the template's text with special tokens
        parsed, message contents that hold special-token strings encoded as plain text; mask = 1 on each
        assistant reply and the end-of-turn token closing it, 0 elsewhere: a token is trained when it starts
        inside such a span (one merging the template's newline with a reply's leading space stays context).
        `where` names the conversation in errors (e.g. "sft.jsonl:12")."""
        validate_messages(messages, where, self.roles)
        render = self._user_render(where, kwargs)
        rendered = render(messages, add_generation_prompt)
        places = locate_contents(render, messages, add_generation_prompt, rendered)
        spans = reply_spans(rendered, places, messages, self.end_token) if places is not None else \
            assistant_spans(render, rendered, messages, self.end_token)  # a template that rewrites contents
        ids, starts = [], []
        for a, b, protected in chat_pieces(rendered, places, messages, self._specials_re, where):
            start = not ids or ids[-1] in self._special_ids  # a fresh start (SentencePiece's dummy prefix)
            seg, offs = self.backend.encode_offsets(rendered[a:b], special=not protected, start=start)
            ids += seg
            starts += [a + o for o in offs]
        mask = [int(any(s <= p < e for s, e in spans)) for p in starts]
        return ids, mask

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path, model_max_length: int | None = None) -> Path:
        """Files from which load_tokenizer(folder) rebuilds this tokenizer. HF backend: tokenizer.json (its
        post-processor adding BOS exactly when add_bos) + tokenizer_config.json + special_tokens_map.json, so
        transformers' AutoTokenizer gives the same ids, chat string and BOS. SentencePiece: llama2.c's tok.bin +
        tokenizer_config.json (ember reads it; transformers cannot)."""
        from ember.tokenizer.hf import with_bos_processor

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = self._tokens()
        others = [t for t in self.ids if t not in names.values()]
        cfg = {**names, "add_bos_token": self.add_bos, "add_eos_token": False, "clean_up_tokenization_spaces": False,
               "additional_special_tokens": others}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        if model_max_length is not None:
            cfg["model_max_length"] = int(model_max_length)
        if self.hf is not None:
            spec = with_bos_processor(json.loads(self.hf.to_str()), names.get("bos_token"), self.bos_id, self.add_bos)
            artifacts.write_text(folder / "tokenizer.json", json.dumps(spec, indent=2, ensure_ascii=False))
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            artifacts.write_json(folder / "special_tokens_map.json",
                                 {**names, "additional_special_tokens": others})
        else:
            artifacts.write_bytes(folder / "tok.bin", self.backend.llama2c_bytes())
            cfg["ember_special_tokens"] = self.ids  # names and ids tok.bin cannot hold
        extra = [i for i in self.stop_ids if i not in (self.eos_id, self.end_id)]
        if extra:
            cfg["ember_stop_ids"] = extra
        artifacts.write_json(folder / "tokenizer_config.json", cfg)
        return folder

    # ------------------------------------------------------------------ ember's fast path
    def tiktoken(self):
        """A tiktoken Encoding giving the same ids as this tokenizer (for text without special tokens), or None.

        Only for the layout `ember tokenizer` trains: SPLIT_PATTERN + ByteLevel, no normalizer, plain BPE whose
        merge k creates a new token with a larger id than merge k-1, so that the rank tiktoken gives a token
        (its id) orders merges as HF's merge list does. The two rules (HF: lowest-ranked listed pair; tiktoken:
        the adjacent pair whose concatenation has the lowest id) could still differ where a token is reachable
        from a pair other than its own merge; they agree on every stdlib document (tested), and `ember
        tokenize` compares both on a sample before using this. None when tiktoken is not installed or the
        tokenizer has another layout.
        """
        try:
            import tiktoken
        except ImportError:
            return None
        if self.hf is None:
            return None
        spec = json.loads(self.hf.to_str())
        model, pre = spec["model"], spec.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", [])
        layout_ok = (
            spec.get("normalizer") is None and pre.get("type") == "Sequence" and len(steps) == 2
            and steps[0].get("type") == "Split" and steps[0].get("pattern") == {"Regex": SPLIT_PATTERN}
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("add_prefix_space")
            and not steps[1].get("use_regex")
            and model.get("type") == "BPE" and not model.get("dropout") and not model.get("byte_fallback")
            and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
        )
        if not layout_ok:
            return None
        vocab = model["vocab"]
        merged = [vocab.get("".join(m) if isinstance(m, list) else m.replace(" ", "")) for m in model["merges"]]
        if None in merged or any(a >= b for a, b in zip(merged, merged[1:])):
            return None  # a merge that repeats or reorders tokens: merge order != id order
        dec = byte_decoder()
        specials = set(self.ids.values())
        ranks = {bytes(dec[c] for c in tok): i for tok, i in vocab.items() if i not in specials}
        if any(bytes([b]) not in ranks for b in range(256)):
            return None
        return tiktoken.Encoding(f"ember-{self.sha256[:12]}", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={})


_LLAMA2C_FILE = re.compile(r"^(tok\d*|tokenizer)\.bin$")


def load_tokenizer(path: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """A tokenizer.json (with tokenizer_config.json etc. beside it when present), the folder holding one (e.g.
    <run>/tokenizer, an HF model folder, a folder `save` wrote), or a llama2.c tok*.bin (vocab_size: how many
    entries to read; the file does not store it)."""
    from ember.tokenizer.hf import HFBackend, folder_settings, load_hf_file, read_settings
    from ember.tokenizer.sentencepiece import SentencePiece

    path = Path(path)
    if path.is_dir():
        bins = sorted(p for p in path.iterdir() if _LLAMA2C_FILE.match(p.name))
        path = path / "tokenizer.json" if (path / "tokenizer.json").is_file() or not bins else bins[0]
    if not path.is_file():
        raise UserError(f"no tokenizer at {path}. Run `ember tokenizer` first, or point the config at a "
                        f"tokenizer.json, the folder holding it, or a llama2.c tok*.bin.")
    if path.suffix == ".bin":
        cfg = read_settings(path.parent / "tokenizer_config.json") if path.name == "tok.bin" else {}
        sp = SentencePiece.load_llama2c(path, vocab_size)
        if "ember_special_tokens" in cfg:  # written by save(): a GGUF vocabulary's own special names
            special = cfg["ember_special_tokens"]
            sp = SentencePiece(sp.pieces, sp.scores, special, unk_id=special.get(cfg.get("unk_token", "<unk>")))
        settings = {"bos": cfg.get("bos_token", "<s>"), "eos": cfg.get("eos_token", "</s>"),
                    "unk": cfg.get("unk_token", "<unk>"), "pad": cfg.get("pad_token"),
                    "add_bos": cfg.get("add_bos_token", True), "chat_template": cfg.get("chat_template"),
                    # llama2.c's run.c ends a story where the model starts the next one (BOS)
                    "extra_stop_ids": tuple(cfg.get("ember_stop_ids", [1] if not cfg else []))}
        return Tokenizer(sp, path, **settings)
    hf = load_hf_file(path)
    settings = folder_settings(path, hf)
    extra = read_settings(path.parent / "tokenizer_config.json").get("ember_stop_ids")
    if extra:
        settings["extra_stop_ids"] = tuple(settings.get("extra_stop_ids", ())) + tuple(extra)
    return Tokenizer(HFBackend(hf), path, **settings)

