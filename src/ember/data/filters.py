"""Per-document curation steps: normalization, language/script, quality heuristics, PII, toxicity, source lists.

A filter returns None to keep a document or a reason "key: detail" to drop it (the key groups rejects in
the data card); a transform rewrites doc["text"]. `TextSteps(cfg)` runs the configured steps in order on
one document; `curate_record` applies the same steps field by field to SFT and preference records.
Thresholds come from a curate `Config` (only the named fields are read), where each cites its paper.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse, urlsplit

import numpy as np

from ember.common.errors import UserError
from ember.data import pii
from ember.data.dedup import EvalIndex, ngram_hashes, token_hashes, words

PER_DOC_STEPS = ("normalize", "language", "quality", "pii", "toxicity", "blocklist", "optout", "decontam")
GLOBAL_STEPS = ("exact_dedup", "near_dedup")  # need every document at once; run after the per-document steps

# ---------------------------------------------------------------------------- normalization

# zero-width space, word joiner, BOM, soft hyphen, controls; not the joiners U+200C/U+200D, which spell words
# (Persian ZWNJ) and emoji sequences
_INVISIBLE = re.compile("[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u00ad\u200b\u2060\ufeff]")
_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")  # no-break and typographic spaces
_BLANKS = re.compile(r"\n{4,}")


def normalize(text: str, form: str = "NFC") -> str:
    """Unicode form, \\n line ends, no invisible/control characters, no trailing spaces, at most 2 blank lines.

    Indentation is kept (code), and 2 blank lines survive (PEP 8 separates top-level definitions by 2).
    """
    if form != "none":
        text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _INVISIBLE.sub("", text)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    text = _BLANKS.sub("\n\n\n", text)
    return text.strip("\n")


# ---------------------------------------------------------------------------- language and script

CODE_EXTS = {".py", ".pyi", ".pyw", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts", ".go", ".rs",
             ".rb", ".sh", ".bat", ".ps1", ".pl", ".php", ".cs", ".swift", ".kt", ".scala", ".lua", ".sql"}
CODE_LANGS = {"code", "python", "c", "c++", "cpp", "java", "javascript", "typescript", "go", "rust", "ruby",
              "shell", "bash", "perl", "php", "c#", "swift", "kotlin", "scala", "lua", "sql", "powershell"}
# Gopher's stop-word rule uses exactly the English eight (Rae et al. 2021, App. A); the others are the most
# frequent function words of each language, for the same "is this running text in language X" test.
STOPWORDS = {
    "en": {"the", "be", "to", "of", "and", "that", "have", "with"},
    "de": {"der", "die", "und", "das", "ist", "nicht", "mit", "sich"},
    "fr": {"le", "la", "les", "et", "est", "une", "dans", "que"},
    "es": {"el", "los", "las", "que", "y", "una", "por", "con"},
    "it": {"il", "che", "di", "una", "per", "non", "sono", "della"},
    "pt": {"o", "os", "que", "uma", "não", "com", "para", "do"},
    "nl": {"de", "het", "een", "en", "van", "niet", "dat", "zijn"},
}


def is_code(doc: dict) -> bool:
    """Source code gets code filters: meta lang/language/kind names a code language, or a file path ends in
    one. Of a URL only the path counts (example.pl/ is a Polish web page), and not .php (a page it renders)."""
    meta = doc.get("meta") or {}
    lang = str(meta.get("lang") or meta.get("language") or meta.get("kind") or "").lower()
    if lang:
        return lang in CODE_LANGS
    url_field = meta.get("url")
    for key in (meta.get("path"), url_field, doc.get("id"), doc.get("source")):
        if not isinstance(key, str):
            continue
        url = "://" in key or key is url_field  # meta.url is a URL even without a scheme (www.onet.pl)
        ext = Path(urlsplit(key if "://" in key else "//" + key).path if url else key).suffix.lower()
        if ext in CODE_EXTS and not (url and ext == ".php"):
            return True
    return False


@functools.lru_cache(maxsize=65536)
def script_of(ch: str) -> str:
    """Writing system of a letter from its Unicode name: 'Latin', 'Cyrillic', 'Han' (CJK), 'Arabic', ..."""
    words = unicodedata.name(ch, "UNKNOWN").split()
    if words[0] in ("FULLWIDTH", "HALFWIDTH", "MATHEMATICAL", "MODIFIER") and len(words) > 1:
        words = words[1:]
    return {"CJK": "Han"}.get(words[0], words[0].capitalize())


_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_NOT_LETTER_BYTES = bytes(b for b in range(256) if not chr(b).isalpha() or b > 127)
_NOT_ALNUM_BYTES = bytes(b for b in range(256) if not chr(b).isalnum() or b > 127)


def _count_bytes(text: str, delete: bytes) -> int:
    """ASCII characters of text not in `delete`: bytes.translate runs in C, ~10x faster than a regex."""
    return len(text.encode("utf-8", "ignore").translate(None, delete))


def script_counts(text: str) -> Counter:
    """Letters per script; ASCII letters are counted in bulk (most text and nearly all code is ASCII)."""
    counts = Counter({"Latin": _count_bytes(text, _NOT_LETTER_BYTES)})
    if not text.isascii():
        counts.update(script_of(ch) for ch in _NON_ASCII.findall(text) if ch.isalpha())
    return counts


def language_check(doc: dict, cfg) -> str | None:
    """Letters mostly in an allowed script; prose must also contain stop words of an allowed language."""
    text = doc["text"]
    counts = script_counts(text)
    total = sum(counts.values())
    if total == 0:
        return "no_letters: the document has no letters"
    allowed = {s.lower() for s in cfg.scripts}
    frac = sum(c for s, c in counts.items() if s.lower() in allowed) / total
    if frac < cfg.min_script_frac:
        top = counts.most_common(1)[0][0]
        return f"script: {frac:.2f} of letters in {'/'.join(cfg.scripts)} < {cfg.min_script_frac} (mostly {top})"
    if is_code(doc) or cfg.min_stopwords <= 0:
        return None
    found = set(words(text))  # lowercased \w+ words: "The," counts as "the"
    hits = {lang: len(STOPWORDS[lang] & found) for lang in cfg.languages}
    if max(hits.values()) < cfg.min_stopwords:
        got = ", ".join(f"{k} {v}/{len(STOPWORDS[k])}" for k, v in hits.items())
        return f"language: fewer than {cfg.min_stopwords} stop words of {'/'.join(cfg.languages)} ({got})"
    return None


# ---------------------------------------------------------------------------- quality heuristics

_BULLETS = ("•", "‣", "◦", "●", "○", "▪", "-", "*", "–")
_POLICY = ("javascript", "terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
           "use cookies")  # C4's boilerplate-line markers (Raffel et al. 2020, Sec. 2.2)
_TERMINAL = (".", "!", "?", '"', "'", "”", "’")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")


def strip_boilerplate(text: str, c4_lines: bool) -> str:
    """Drop C4 boilerplate lines (javascript/cookie/policy notices); with c4_lines also every line that has
    fewer than 3 words or does not end in terminal punctuation (right for web pages, wrong for wrapped books)."""
    out = []
    for line in text.split("\n"):
        low = line.lower()
        if any(p in low for p in _POLICY):
            continue
        if c4_lines and line.strip() and (len(line.split()) < 3 or not line.rstrip().endswith(_TERMINAL)):
            continue
        out.append(line)
    return "\n".join(out).strip("\n")


def _dup_fractions(parts: list[str]) -> tuple[float, float]:
    """(fraction of parts that repeat an earlier part, fraction of characters in those repeats)."""
    seen, dup, dup_chars = set(), 0, 0
    for p in parts:
        if p in seen:
            dup, dup_chars = dup + 1, dup_chars + len(p)
        else:
            seen.add(p)
    total = sum(len(p) for p in parts)
    return dup / max(len(parts), 1), dup_chars / max(total, 1)


def ngram_repetition(words: list[str], n: int) -> tuple[float, float]:
    """(chars in the most frequent n-gram times its count, chars covered by repeated n-grams), as fractions
    of all word characters. A repeat is every occurrence after the first; a character counts once."""
    lens = np.array([len(w) for w in words])
    total = lens.sum()
    g = ngram_hashes(token_hashes([w.lower() for w in words]), n, short=False)
    if len(g) == 0 or total == 0:
        return 0.0, 0.0
    uniq, first, inverse, counts = np.unique(g, return_index=True, return_inverse=True, return_counts=True)
    gram_chars = np.convolve(lens, np.ones(n, dtype=lens.dtype), mode="valid")  # (len(g),) chars per n-gram
    top = counts.argmax()
    top_frac = gram_chars[first[top]] * counts[top] / total if counts[top] > 1 else 0.0
    repeats = np.flatnonzero(np.arange(len(g)) != first[inverse])  # occurrences after the first
    cover = np.zeros(len(words) + 1, np.int64)
    np.add.at(cover, repeats, 1)
    np.add.at(cover, repeats + n, -1)
    covered = np.cumsum(cover[:-1]) > 0
    return float(top_frac), float(lens[covered].sum() / total)


def gopher_quality(text: str, cfg) -> str | None:
    """Gopher's quality rules (Rae et al. 2021, App. A.1.1) on prose; thresholds from cfg."""
    words = text.split()
    n = len(words)
    if n < cfg.min_words:
        return f"too_short: {n} words < min_words {cfg.min_words}"
    if n > cfg.max_words:
        return f"too_long: {n} words > max_words {cfg.max_words}"
    mean = sum(len(w) for w in words) / n
    if not cfg.min_mean_word_len <= mean <= cfg.max_mean_word_len:
        return f"word_length: mean {mean:.1f} outside [{cfg.min_mean_word_len}, {cfg.max_mean_word_len}]"
    for name, count in (("hash", text.count("#")), ("ellipsis", text.count("...") + text.count("…"))):
        if count / n > cfg.max_symbol_ratio:  # Gopher: either symbol alone over the ratio, not their sum
            return f"symbols: {count / n:.3f} {name} per word > {cfg.max_symbol_ratio}"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    bullets = sum(ln.startswith(_BULLETS) for ln in lines) / len(lines)
    if bullets > cfg.max_bullet_lines:
        return f"bullets: {bullets:.2f} of lines are bullet points > {cfg.max_bullet_lines}"
    ellipsis = sum(ln.endswith(("...", "…")) for ln in lines) / len(lines)
    if ellipsis > cfg.max_ellipsis_lines:
        return f"ellipsis: {ellipsis:.2f} of lines end in an ellipsis > {cfg.max_ellipsis_lines}"
    alpha = sum(any(c.isalpha() for c in w) for w in words) / n
    if alpha < cfg.min_alpha_words:
        return f"alpha: {alpha:.2f} of words have a letter < {cfg.min_alpha_words}"
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    for name, parts in (("lines", lines), ("paragraphs", paragraphs)):
        frac, char_frac = _dup_fractions(parts)
        if frac > cfg.max_dup_lines:
            return f"dup_{name}: {frac:.2f} of {name} are repeats > {cfg.max_dup_lines}"
        if char_frac > cfg.max_dup_line_chars:
            return f"dup_{name}: {char_frac:.2f} of characters in repeated {name} > {cfg.max_dup_line_chars}"
    for n_, limit in zip(range(2, 2 + len(cfg.max_top_ngram)), cfg.max_top_ngram):  # n = 2, 3, 4
        top = ngram_repetition(words, n_)[0]
        if top > limit:
            return f"top_ngram: the most frequent {n_}-gram covers {top:.2f} of characters > {limit}"
    for n_, limit in zip(range(5, 5 + len(cfg.max_dup_ngram)), cfg.max_dup_ngram):  # n = 5 .. 10
        dup = ngram_repetition(words, n_)[1]
        if dup > limit:
            return f"dup_ngram: repeated {n_}-grams cover {dup:.2f} of characters > {limit}"
    return None


def c4_page(text: str) -> str | None:
    """C4's page rules, used with c4_lines: at least 5 sentences, no 'lorem ipsum', no curly braces."""
    if "lorem ipsum" in text.lower():
        return "c4: placeholder text (lorem ipsum)"
    if "{" in text:
        return "c4: curly brace (code or markup)"
    if len(_SENTENCE_END.findall(text)) < 5:
        return "c4: fewer than 5 sentences"
    return None


_GENERATED = re.compile(r"(?i)auto-?generated|automatically generated|generated by|do not edit|generated from")


def code_quality(text: str, cfg) -> str | None:
    """Codex's code filters (Chen et al. 2021, Sec. 3.1; StarCoder reuses them): line lengths, alphanumeric
    fraction, and a header that says the file was generated."""
    lines = text.split("\n")
    longest = max(len(ln) for ln in lines)
    if longest > cfg.max_line_len:
        return f"long_line: a line of {longest} characters > max_line_len {cfg.max_line_len}"
    mean = len(text) / len(lines)
    if mean > cfg.max_mean_line_len:
        return f"line_length: mean line {mean:.0f} characters > max_mean_line_len {cfg.max_mean_line_len}"
    alnum = _count_bytes(text, _NOT_ALNUM_BYTES) / max(len(text), 1)
    if not text.isascii():
        alnum += sum(c.isalnum() for c in _NON_ASCII.findall(text)) / max(len(text), 1)
    if alnum < cfg.min_alnum_frac:
        return f"alnum: {alnum:.2f} of characters alphanumeric < {cfg.min_alnum_frac}"
    if cfg.drop_generated:
        m = _GENERATED.search("\n".join(lines[:5]))
        if m:
            return f"generated: header says {m.group(0)!r}"
    return None


# ---------------------------------------------------------------------------- toxicity and source lists

def _read_list(path: str, what: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file {path} not found; give a text file with one entry per line")
    lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


class Lexicon:
    """A list of words and phrases (e.g. LDNOOBW); hits(text) counts them on lowercased `\\w+` words.

    Terms are tokenized the same way ("s&m" becomes the phrase s m); terms without a word character (emoji)
    are counted as substrings.
    """

    def __init__(self, path: str):
        self.words: set[str] = set()
        self.phrases: dict[str, list[tuple[str, ...]]] = {}  # first word -> phrases starting with it
        self.symbols: list[str] = []
        for term in _read_list(path, "toxic word list"):
            toks = tuple(re.findall(r"\w+", term.lower()))
            if len(toks) == 1:
                self.words.add(toks[0])
            elif toks:
                self.phrases.setdefault(toks[0], []).append(toks)
            else:
                self.symbols.append(term)

    def hits(self, text: str) -> tuple[int, int]:
        """(terms found, words in text); a phrase counts once, at its first word."""
        toks = words(text)
        n = sum(text.count(s) for s in self.symbols)
        found = set(toks)
        if found & self.words:
            n += sum(t in self.words for t in toks)
        if found & self.phrases.keys():
            for i, t in enumerate(toks):
                for ph in self.phrases.get(t, ()):
                    n += tuple(toks[i:i + len(ph)]) == ph
        return n, len(toks)


class SourceList:
    """Domains, URL prefixes and sources; `match(doc)` returns the entry that names the document, if any.

    An entry matches a document's URL host or any subdomain ("example.com"), a URL prefix ("https://x.org/a/"),
    or the document's source/id/path exactly or as a prefix ending in "/" or ":" ("stdlib:test/").
    """

    def __init__(self, path: str, what: str):
        self.entries = _read_list(path, what)

    def match(self, doc: dict) -> str | None:
        meta = doc.get("meta") or {}
        keys = [k for k in (doc.get("source"), doc.get("id"), meta.get("url"), meta.get("path")) if isinstance(k, str)]
        hosts = {urlparse(k).hostname for k in keys if "://" in k} - {None}
        for e in self.entries:
            low = e.lower()
            if any(h == low or h.endswith("." + low) for h in hosts):
                return e
            if any(k == e or (e.endswith(("/", ":")) and k.startswith(e)) for k in keys):
                return e
        return None


# ---------------------------------------------------------------------------- running steps

class TextSteps:
    """The configured per-document steps, in order. Call on a document: edits it in place and returns
    (step, reason) when a step drops it, else None. Global steps (dedup) are the stage's business."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.steps = [s for s in cfg.steps if s in PER_DOC_STEPS]
        self.lexicon = Lexicon(cfg.toxic_words) if "toxicity" in self.steps else None
        self.blocklist = SourceList(cfg.blocklist, "blocklist") if "blocklist" in self.steps else None
        self.optout = SourceList(cfg.optout, "opt-out list") if "optout" in self.steps else None
        self.evals = EvalIndex(cfg.eval_sets, cfg.decontam_ngram) if "decontam" in self.steps else None
        self.fns = {s: getattr(self, "_" + s) for s in self.steps}

    def __call__(self, doc: dict, stats: dict | None = None) -> tuple[str, str] | None:
        """stats, when given: step -> [docs in, bytes in, docs out, bytes out], updated in place."""
        for name, fn in self.fns.items():
            if stats is not None:
                s = stats.setdefault(name, [0, 0, 0, 0])
                s[0] += 1
                s[1] += len(doc["text"].encode("utf-8"))
            reason = fn(doc)
            if reason:
                return name, reason
            if stats is not None:
                s[2] += 1
                s[3] += len(doc["text"].encode("utf-8"))
        return None

    def _normalize(self, doc):
        doc["text"] = normalize(doc["text"], self.cfg.unicode_form)
        return None if doc["text"].strip() else "empty: nothing left after normalization"

    def _language(self, doc):
        return language_check(doc, self.cfg)

    def _quality(self, doc):
        if is_code(doc):
            return code_quality(doc["text"], self.cfg)
        doc["text"] = strip_boilerplate(doc["text"], self.cfg.c4_lines)
        if self.cfg.c4_lines and (reason := c4_page(doc["text"])):
            return reason
        return gopher_quality(doc["text"], self.cfg)

    def _pii(self, doc):
        doc["text"], counts = pii.scrub(doc["text"], self.cfg.pii)
        if counts:  # the data card counts these over the documents curate keeps
            doc.setdefault("meta", {})["pii"] = dict(counts)
        return None

    def _toxicity(self, doc):
        hits, words = self.lexicon.hits(doc["text"])
        score = hits / max(words, 1)
        if score > self.cfg.max_toxic_frac:
            return f"toxic: {hits} listed terms in {words} words = {score:.4f} > max_toxic_frac {self.cfg.max_toxic_frac}"
        return None

    def _blocklist(self, doc):
        e = self.blocklist.match(doc)
        return f"blocked: {e!r} is on the blocklist" if e else None

    def _optout(self, doc):
        e = self.optout.match(doc)
        return f"opted_out: {e!r} is on the opt-out list" if e else None

    def _decontam(self, doc):
        found = self.evals.match(doc["text"])
        if not found:
            return None
        sets = ", ".join(f"{k} ({v})" for k, v in found.items())
        if self.cfg.decontam_action == "drop":
            return f"contaminated: shares {self.cfg.decontam_ngram}-grams with {sets}"
        doc.setdefault("meta", {})["contaminated"] = found
        return None


# ---------------------------------------------------------------------------- SFT and preference records

TEXT_FIELDS = ("messages", "prompt", "chosen", "rejected", "completion", "response", "answer")


def record_texts(record: dict) -> list[tuple[str, str]]:
    """(field path, text) of every text in an SFT {"messages"} / preference {"prompt","chosen","rejected"} /
    RL {"prompt","answer"} record; a field may be a string or a list of {"role","content"} messages."""
    out = []
    for key in TEXT_FIELDS:
        value = record.get(key)
        if isinstance(value, str):
            out.append((key, value))
        elif isinstance(value, list):
            out += [(f"{key}[{i}].content", m["content"]) for i, m in enumerate(value)
                    if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return out


def _set_text(record: dict, path: str, text: str) -> None:
    if "[" in path:
        key, i = path.split("[")[0], int(path.split("[")[1].split("]")[0])
        record[key][i]["content"] = text
    else:
        record[path] = text


def map_record(record: dict, fn) -> dict:
    """A copy of record with fn(text) -> text applied to every text field (e.g. PII scrubbing)."""
    out = {k: ([dict(m) if isinstance(m, dict) else m for m in v] if isinstance(v, list) else v)
           for k, v in record.items()}
    for path, text in record_texts(record):
        _set_text(out, path, fn(text))
    return out


def curate_record(record: dict, steps: TextSteps) -> tuple[dict | None, tuple[str, str] | None]:
    """Run the per-document steps on each text field; (new record, None) or (None, (step, "field: reason")).

    A record is dropped when any of its fields is (a toxic `rejected` answer drops the whole pair, so a
    preference set never keeps half a comparison). Source lists see the record's own source/id/meta.
    """
    out = map_record(record, lambda t: t)
    for path, text in record_texts(record):
        doc = {"id": str(record.get("id", "")), "text": text, "source": str(record.get("source", "")),
               "meta": dict(record.get("meta") or {})}
        dropped = steps(doc)
        if dropped:
            return None, (dropped[0], f"{path}: {dropped[1]}")
        _set_text(out, path, doc["text"])
        if "contaminated" in doc["meta"]:
            out.setdefault("meta", {}).setdefault("contaminated", {}).update(doc["meta"]["contaminated"])
    return out, None
