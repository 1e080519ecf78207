"""PII scrubbing: emails, phone numbers, IP addresses, credit-card numbers and secrets -> typed placeholders.

    text, counts = scrub("mail bob@example.com", ["email"])   # ("mail <|EMAIL|>", Counter({"email": 1}))

Regexes find candidates, validators reject look-alikes: a card number needs a known issuer prefix and length
and a valid Luhn checksum; an IP must parse, be globally routable (127.0.0.1, 10.x, 192.168.x and slices
like `a[1::2]` stay) and not follow a version cue ("version 1.2.3.4", "v1.2.3.4"); a phone must follow the
North American plan with separators, or start with "+" (dates such as 2023-10-12 never match). Every
pattern starts with a literal or is gated by a substring test: Python's `re` scans for a literal prefix
quickly but tries a leading character class at every position, which was 10x slower on source code.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from typing import Iterable

PLACEHOLDERS = {
    "email": "<|EMAIL|>",
    "phone": "<|PHONE|>",
    "ip": "<|IP|>",
    "credit_card": "<|CREDIT_CARD|>",
    "secret": "<|SECRET|>",
}
KINDS = tuple(PLACEHOLDERS)
Span = tuple[int, int]

# (substring gate, pattern): secrets with a recognisable shape, prefixes as each provider documents them.
_SECRET_SHAPES = [(gate, re.compile(p)) for gate, p in [
    (("PRIVATE KEY",), r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    (("AKIA", "ASIA"), r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b"),  # GitHub
    (("github_pat_",), r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b"),
    (("xox",), r"\bxox[abposr]-[A-Za-z0-9-]{10,250}\b"),  # Slack
    (("sk-",), r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}\b"),  # OpenAI / Anthropic style
    (("k_live_", "k_test_"), r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{16,}\b"),  # Stripe
    (("AIza",), r"\bAIza[0-9A-Za-z_-]{35}\b"),  # Google API key
    (("hf_",), r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face
    (("eyJ",), r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # JWT
]]
# `api_key = "..."`-style assignments, matched on the lowercased text: only a random-looking value is replaced.
_SECRET_ASSIGN = re.compile(r"""(?:key|secret|token|passw(?:or)?d)["']?\s*[:=]\s*(["'])([^"'\s]{16,200})\1""")
_EMAIL_DOMAIN = re.compile(r"@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}\b")
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}\Z")  # searched in the 64 characters before "@"
_CARD = re.compile(r"\d(?:[ -]?\d){12,18}")
_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_IPV6_SEED = re.compile(r":[0-9A-Fa-f]{0,4}:")
_HEX_COLON = set("0123456789abcdefABCDEF:")
# A dotted quad right after one of these is a version or section number, not an address.
_VERSION_CUE = re.compile(
    r"""(?i)(?:\bv|versions?_*|\bver\.?|\breleases?|\brev\.?|python|\bsections?|§)\s*[:=#-]?\s*["']?\Z""")
_PHONE_PAREN = re.compile(r"\(([2-9])\d\d\)\s?([2-9])\d\d[ .-]\d{4}")  # (555) 234-5678
_PHONE_SEP = re.compile(r"([2-9])\d\d([.-])([2-9])\d\d\2\d{4}")  # 555-234-5678, 555.234.5678
_PHONE_PLUS = re.compile(r"\+\d[\d ()-]{6,20}\d")  # +44 20 7946 0958, +1 (555) 234-5678
_NANP_PREFIX = re.compile(r"\+?1[ .-]?\Z")  # a "+1 " written before a North American number


def luhn_ok(digits: str) -> bool:
    """The Luhn mod-10 checksum every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_issuer_ok(digits: str) -> bool:
    """Issuer prefix and length of Visa, Mastercard, Amex, Discover, JCB, Diners (ISO/IEC 7812 IIN ranges)."""
    n, p2, p3, p4 = len(digits), int(digits[:2]), int(digits[:3]), int(digits[:4])
    return ((digits[0] == "4" and n in (13, 16, 19))
            or ((51 <= p2 <= 55 or 2221 <= p4 <= 2720) and n == 16)
            or (p2 in (34, 37) and n == 15)
            or ((p4 == 6011 or p2 == 65 or 644 <= p3 <= 649) and 16 <= n <= 19)
            or (3528 <= p4 <= 3589 and 16 <= n <= 19)
            or ((300 <= p3 <= 305 or p2 in (36, 38)) and n == 14))


def _word_char(text: str, i: int, extra: str = "") -> bool:
    """Is text[i] a word character (or one of extra)? Out of range counts as no."""
    return 0 <= i < len(text) and (text[i].isalnum() or text[i] == "_" or text[i] in extra)


def _looks_random(value: str) -> bool:
    """A secret mixes letters and digits with high character entropy; 'changeme_please_now' does not."""
    if not (any(c.isdigit() for c in value) and any(c.isalpha() for c in value)):
        return False
    counts = Counter(value)
    return -sum(c / len(value) * math.log2(c / len(value)) for c in counts.values()) >= 3.5


def find_secrets(text: str) -> list[Span]:
    spans = [m.span() for gate, pat in _SECRET_SHAPES if any(g in text for g in gate) for m in pat.finditer(text)]
    low = text.lower()
    if len(low) == len(text):  # lower() kept every offset (true for all but a few exotic characters)
        spans += [m.span(2) for m in _SECRET_ASSIGN.finditer(low) if _looks_random(text[m.start(2):m.end(2)])]
    return spans


def _code_not_email(text: str, start: int, end: int) -> bool:
    """Does the "domain" of an @-match read as code rather than an address? `q@k.transpose(` (a call),
    `x@self.weight` (an attribute of self), `a@w.mT` (a camelCase attribute), `sd_IN@devanagari.UTF-8` (a
    locale: a TLD that runs on into "-8"). Real top-level domains are all one case or Title-case (.Com)."""
    domain = text[start + 1:end]
    tld = domain.rsplit(".", 1)[1]
    camel = any(a.islower() and b.isupper() for a, b in zip(tld, tld[1:]))
    runs_on = text[end:end + 1] == "(" or (text[end:end + 1] == "-" and _word_char(text, end + 1))
    return camel or runs_on or domain.split(".", 1)[0] == "self"


def find_emails(text: str) -> list[Span]:
    spans = []
    for m in _EMAIL_DOMAIN.finditer(text):
        if _code_not_email(text, m.start(), m.end()):
            continue
        local = _EMAIL_LOCAL.search(text, max(0, m.start() - 64), m.start())
        if local and not _word_char(text, local.start() - 1, ".+-"):
            spans.append((local.start(), m.end()))
    return spans


def _group_prefixes(run: str) -> list[int]:
    """Lengths of `run` to try, longest first: all of it, then each prefix that ends where a separator
    begins ("4111 1111 1111 1111 12/25": the digits after the number are grabbed too, then let go)."""
    return [len(run)] + [i for i in range(len(run) - 1, 0, -1) if run[i] in " -" and run[i - 1].isdigit()]


def find_cards(text: str) -> list[Span]:
    spans = []
    for m in _CARD.finditer(text):
        s, e = m.span()
        if _word_char(text, s - 1, "-"):
            continue  # part of a longer number or identifier
        for k in _group_prefixes(m.group(0)):
            cand = m.group(0)[:k]
            if k == len(m.group(0)) and _word_char(text, e, "-"):
                continue  # the whole run runs on into more digits or letters
            if len(set(re.findall(r"[ -]", cand))) > 1:
                continue  # mixed separators ("4111 1111-1111 1111") are not how card numbers are written
            digits = re.sub(r"[ -]", "", cand)
            if len(digits) >= 13 and card_issuer_ok(digits) and luhn_ok(digits):
                spans.append((s, s + k))
                break
    return spans


def _public_ip(s: str) -> bool:
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        return False  # 999.1.1.1, a::b::c: not an address
    return ip.is_global and not ip.is_multicast  # loopback, private, reserved, documentation ranges identify nobody


def find_ips(text: str) -> list[Span]:
    spans = []
    for m in _IPV4.finditer(text):
        s, e = m.span()
        if _word_char(text, s - 1, ".") or _word_char(text, e) or (text[e:e + 1] == "." and _word_char(text, e + 1)):
            continue  # 1.2.3.4.5, x1.2.3.4: part of something longer
        if any(len(o) > 1 and o[0] == "0" for o in m.group(0).split(".")):
            continue  # 01.02.03.04 is not how addresses are written
        if _public_ip(m.group(0)) and not _VERSION_CUE.search(text, max(0, s - 20), s):
            spans.append((s, e))
    if "::" in text or text.count(":") >= 7:
        end = -1
        for m in _IPV6_SEED.finditer(text):
            s, e = m.span()
            if s < end:
                continue
            while s > 0 and text[s - 1] in _HEX_COLON:
                s -= 1
            while e < len(text) and text[e] in _HEX_COLON:
                e += 1
            if text[e:e + 1] == "." and (tail := _IPV4.match(text, text.rfind(":", s, e) + 1)):
                e = tail.end()  # ::ffff:81.2.69.142, an IPv4 address in IPv6 form: the whole of it
            end = e
            cand = text[s:e]
            # 3+ colons: short forms like 1::2 are mostly slices in code; bounded by non-word characters
            if cand.count(":") >= 3 and not _word_char(text, s - 1) and not _word_char(text, e) and _public_ip(cand):
                spans.append((s, e))
    return spans


def find_phones(text: str) -> list[Span]:
    spans = []
    for pat in (_PHONE_PAREN, _PHONE_SEP):
        for m in pat.finditer(text):
            s, e = m.span()
            if _word_char(text, e) or (text[e:e + 1] in ("-", ".") and _word_char(text, e + 1)):
                continue
            prefix = _NANP_PREFIX.search(text, max(0, s - 3), s)
            if prefix:
                s = prefix.start()
            if not _word_char(text, s - 1, "+.-"):
                spans.append((s, e))
    if "+" in text:
        for m in _PHONE_PLUS.finditer(text):
            s, e = m.span()
            if _word_char(text, s - 1, "+"):
                continue
            for k in _group_prefixes(m.group(0)):  # "+44 20 7946 0958 2024 edition": the year is not the number's
                if k == len(m.group(0)) and _word_char(text, e):
                    continue
                digits = re.sub(r"\D", "", m.group(0)[:k])
                if digits[0] == "1":  # North America: +1 and ten digits, area code and exchange starting 2-9
                    ok = len(digits) == 11 and digits[1] in "23456789" and digits[4] in "23456789"
                else:
                    ok = 10 <= len(digits) <= 15  # E.164 allows at most 15 digits
                if ok:
                    spans.append((s, s + k))
                    break
    return spans


FINDERS = {"secret": find_secrets, "email": find_emails, "credit_card": find_cards, "ip": find_ips, "phone": find_phones}


def _replace(text: str, spans: list[Span], placeholder: str) -> tuple[str, int]:
    """Replace non-overlapping spans (the earliest wins an overlap) by the placeholder."""
    out, pos, n = [], 0, 0
    for s, e in sorted(spans):
        if s < pos:
            continue
        out += [text[pos:s], placeholder]
        pos, n = e, n + 1
    return "".join(out) + text[pos:], n


def scrub(text: str, kinds: Iterable[str] = KINDS) -> tuple[str, Counter]:
    """Replace each kind of PII in text by its placeholder; returns (text, Counter kind -> replacements).

    Order matters: secrets first (keys hold digit runs), then emails, cards (before phones: a card's groups
    of four look like phone digits), IPs, phones; each later kind runs on the already-scrubbed text.
    """
    kinds = set(kinds)
    assert kinds <= set(KINDS), kinds - set(KINDS)  # the stage's config validation names a bad kind for users
    counts: Counter = Counter()
    for kind in ("secret", "email", "credit_card", "ip", "phone"):
        if kind in kinds:
            spans = FINDERS[kind](text)
            if spans:
                text, n = _replace(text, spans, PLACEHOLDERS[kind])
                counts[kind] += n
    return text, counts
