"""PII scrubbing: each kind is replaced by its placeholder, and look-alikes (versions, dates, slices,
invalid card numbers, private addresses) survive unchanged."""

import pytest

from ember.data.pii import PLACEHOLDERS, card_issuer_ok, luhn_ok, scrub


def only(text, kind):
    out, counts = scrub(text, [kind])
    return out, counts[kind]


@pytest.mark.parametrize("text, expected", [
    ("mail bob.smith+news@example.co.uk today", "mail <|EMAIL|> today"),
    ("Written by Marc (mal@lemburg.com).", "Written by Marc (<|EMAIL|>)."),
    ("__author__ = 'Bob <bob@redivi.com>'", "__author__ = 'Bob <<|EMAIL|>>'"),
    ("Mail John.Smith@Example.Com now", "Mail <|EMAIL|> now"),  # any case, any TLD
    ("write to jane@startup.ventures", "write to <|EMAIL|>"),
])
def test_emails_replaced(text, expected):
    assert only(text, "email") == (expected, 1)


@pytest.mark.parametrize("text", [
    "@property\ndef name(self): ...",  # decorators
    "@functools.wraps(f)",
    "user@localhost has no domain",
    "a @ b.com with spaces",
    "matrix @ other.T",
    "s = q@k.transpose(-2, -1)", "y = x@self.weight", "z = a@w.mT",  # matrix products in code
    "locale 'sd_IN@devanagari.UTF-8'",
])
def test_email_lookalikes_survive(text):
    assert only(text, "email") == (text, 0)


@pytest.mark.parametrize("text", [
    "(555) 234-5678", "555-234-5678", "555.234.5678", "+1 555 234 5678", "1-555-234-5678",
    "+1 (555) 234-5678", "+44 20 7946 0958", "+14155552671",
])
def test_phones_replaced(text):
    out, n = only(f"call {text} now", "phone")
    assert (out, n) == ("call <|PHONE|> now", 1)


def test_numbers_after_a_phone_or_card_are_let_go():
    assert only("Tel +44 20 7946 0958 2024 edition", "phone") == ("Tel <|PHONE|> 2024 edition", 1)
    assert only("Card: 4111 1111 1111 1111 12/25", "credit_card") == ("Card: <|CREDIT_CARD|> 12/25", 1)
    assert only("visa 4111 1111 1111 1111 123", "credit_card") == ("visa <|CREDIT_CARD|> 123", 1)


@pytest.mark.parametrize("text", [
    "2023-10-12", "12/10/2023", "2023.10.12 10:30:45", "1700000000",  # dates, times, a Unix timestamp
    "123-45-6789",  # 3-2-4 grouping is not a phone number
    "123-456-7890",  # area codes never start with 0 or 1
    "555-234.5678",  # mixed separators
    "x = 5552345678",  # ten digits without separators could be any number
    "1e+1000000000", "y = +3.14159265358979",  # exponents and floats
    "555-234-56789",  # too many digits
])
def test_phone_lookalikes_survive(text):
    assert only(text, "phone") == (text, 0)


@pytest.mark.parametrize("text", [
    "4111 1111 1111 1111",  # Visa test number
    "4012888888881881",
    "5555-5555-5555-4444",  # Mastercard
    "3782 822463 10005",  # Amex 4-6-5 grouping
    "6011 1111 1111 1117",  # Discover
])
def test_cards_replaced(text):
    assert only(f"card: {text}.", "credit_card") == ("card: <|CREDIT_CARD|>.", 1)


@pytest.mark.parametrize("text", [
    "4111 1111 1111 1112",  # Luhn check fails
    "1234567890123452",  # passes Luhn, but no issuer starts with 1
    "4111 1111-1111 1111",  # mixed separators
    "x41111111111111111",  # part of an identifier
    "18446744073709551616",  # 2**64: 20 digits
])
def test_card_lookalikes_survive(text):
    assert luhn_ok("1234567890123452") and not card_issuer_ok("1234567890123452")
    assert only(text, "credit_card") == (text, 0)


def test_luhn_hand_computed():
    # 79927398713: doubled odd positions from the right 2,6,4,9(=18),4 ... sum 70 -> valid
    assert luhn_ok("79927398713")
    assert not luhn_ok("79927398710")
    assert luhn_ok("0") and not luhn_ok("1")


@pytest.mark.parametrize("text", ["8.8.8.8", "93.184.216.34", "1.2.3.4", "2001:4860:4860::8888",
                                  "2a00:1450:4001:81c::200e", "::ffff:81.2.69.142"])  # IPv4 in IPv6 form: whole
def test_public_ips_replaced(text):
    assert only(f"host {text} answered", "ip") == ("host <|IP|> answered", 1)


@pytest.mark.parametrize("text", [
    "127.0.0.1", "10.0.0.1", "192.168.1.1", "0.0.0.0", "169.254.1.1",  # loopback, private, link-local
    "version 1.2.3.4", "v1.2.3.4", "Version: 1.2.3.4", "version='2.0.1.3'", "Python 3.11.7.1", "section 8.1.2.2",
    "__version__ = '3.11.7.2'", "rfc7231#section-7.1.1.1", "section-8.2.4.45",
    "1.2.3.4.5", "999.1.1.1", "01.02.03.04",  # too long, out of range, zero-padded
    "a[1::2]", "x[::2]", "::1", "fe80::1", "d[1:2:3]",  # slices, loopback and link-local IPv6
])
def test_ip_lookalikes_survive(text):
    assert only(f"see {text} here", "ip") == (f"see {text} here", 0)


@pytest.mark.parametrize("text", [
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_aBcdEfGhIjKlMnOpQrStUvWxYz0123456789",
    "sk-proj-abcdefghijklmnopqrstuvwxyz012345",
    "xoxb-123456789012-abcdefghijkl",
    "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
])
def test_secret_shapes_replaced(text):
    assert only(f"token: {text} end", "secret") == ("token: <|SECRET|> end", 1)


def test_secret_assignments_need_random_values():
    out, n = only("api_key = 'f8Jk2LmQ9xZ3vB7nR1tY'\npassword = \"correcthorsebatterystaple\"\n", "secret")
    assert out == "api_key = '<|SECRET|>'\npassword = \"correcthorsebatterystaple\"\n" and n == 1
    assert only("TOKEN: 'aaaaaaaaaaaaaaaa1111'", "secret")[1] == 0  # low entropy


def test_scrub_all_kinds_counts_and_order():
    text = ("Contact jane@example.org or (555) 234-5678, server 8.8.4.4, card 4111-1111-1111-1111, "
            "key AKIAIOSFODNN7EXAMPLE. Released 2023-10-12, version 1.2.3.4, localhost 127.0.0.1.")
    out, counts = scrub(text)
    assert counts == {"email": 1, "phone": 1, "ip": 1, "credit_card": 1, "secret": 1}
    for kind in counts:
        assert PLACEHOLDERS[kind] in out
    assert "2023-10-12" in out and "version 1.2.3.4" in out and "127.0.0.1" in out
    # card digits grouped in fours must not be half-taken by the phone pattern
    assert "1111" not in out


def test_scrub_respects_kinds_and_is_idempotent():
    text = "jane@example.org at 8.8.4.4"
    out, counts = scrub(text, ["ip"])
    assert out == "jane@example.org at <|IP|>" and counts == {"ip": 1}
    again, counts2 = scrub(scrub(text)[0])
    assert again == scrub(text)[0] and not counts2
