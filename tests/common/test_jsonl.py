"""JSON Lines reading: errors name the file and the exact line."""

import gzip

import pytest

from ember.common.errors import UserError
from ember.common.jsonl import read_jsonl


def test_a_bad_byte_is_reported_on_its_own_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    lines = [b'{"text": "fine"}\n'] * 500
    lines[300] = b'{"text": "caf\xe9"}\n'  # latin-1, not UTF-8, on line 301 (the reader used to say line 1)
    f.write_bytes(b"".join(lines))
    with pytest.raises(UserError, match=r"bad.jsonl:301: not UTF-8 text"):
        list(read_jsonl(f))


def test_lines_blank_lines_and_gzip(tmp_path):
    f = tmp_path / "ok.jsonl.gz"
    with gzip.open(f, "wt", encoding="utf-8") as g:
        g.write('{"a": 1}\n\n{"a": "\u00e9"}\r\n')
    assert list(read_jsonl(f)) == [(1, {"a": 1}), (3, {"a": "\u00e9"})]
    f.write_bytes(gzip.compress(b'{"a": 1}\n[1, 2]\n'))
    with pytest.raises(UserError, match=r"ok.jsonl.gz:2: expected a JSON object, got list"):
        list(read_jsonl(f))
