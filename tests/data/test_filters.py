"""Per-document curation steps: keep/drop decisions on hand-made documents, one rule at a time."""

from pathlib import Path

import pytest

from ember.data.curate import Config
from ember.data.filters import (Lexicon, SourceList, TextSteps, c4_page, code_quality, curate_record, gopher_quality,
                                is_code, language_check, map_record, ngram_repetition, normalize, record_texts,
                                script_of, strip_boilerplate)
from ember.data.pii import scrub

ASSETS = Path(__file__).parents[1] / "assets" / "curate"
LDNOOBW = Path(__file__).parents[3] / "shared" / "datasets" / "ldnoobw" / "en"

# ~90 words of ordinary English prose: passes every Gopher rule with the paper's thresholds.
PROSE = ("The river had been rising for three days before anyone in the village thought to move the boats. "
         "By the time the fishermen reached the harbour, the water was already lapping at the steps of the "
         "old customs house, and the children had been sent up the hill with the goats.\n\n"
         "Martha stayed behind with her father. They carried nets, lanterns and a chest of letters to the "
         "loft, working in silence while the rain drummed on the roof. Later she would remember that night "
         "as the moment she understood how quickly an ordinary place can change.")


def doc(text, **meta):
    return {"id": "d", "text": text, "source": "test", "meta": meta}


def test_normalize():
    text = "Cafe\u0301\r\nzero\u200bwidth\u00a0space   \n\n\n\n\n    indented\tline  \r\n\ufeff"
    assert normalize(text) == "Café\nzerowidth space\n\n\n    indented\tline"
    assert normalize("ﬁne", "NFKC") == "fine" and normalize("ﬁne", "NFC") == "ﬁne"
    assert normalize("def f():\n    pass\n\n\ndef g(): pass\n") == "def f():\n    pass\n\n\ndef g(): pass"  # PEP 8 kept
    for kept in ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "\U0001f468\u200d\U0001f469\u200d\U0001f467"):
        assert normalize(kept) == kept  # ZWNJ in Persian words, ZWJ in emoji sequences


def test_is_code():
    assert is_code(doc("x", kind="code")) and not is_code(doc("x", kind="docs"))
    assert is_code({"id": "stdlib/json/decoder.py", "text": "", "source": "stdlib", "meta": {}})
    assert is_code(doc("x", url="https://example.com/a/b.rs?raw=1"))
    for url in ("https://www.example.pl/", "https://shop.example.rs/watches", "https://example.com/article.php?id=3",
                "www.onet.pl"):
        assert not is_code(doc("x", url=url)), url  # a web page: the domain and .php say nothing of code
    assert is_code(doc("x", lang="perl")) and is_code(doc("x", path="tools/x.pl"))
    assert not is_code(doc("x", path="notes/readme.txt"))


def test_script_and_language():
    cfg = Config()
    assert script_of("ж") == "Cyrillic" and script_of("中") == "Han" and script_of("é") == "Latin"
    assert language_check(doc(PROSE), cfg) is None
    russian = "Это был тёплый вечер, и мы долго сидели у реки, разговаривая о лете и о книгах. " * 3
    assert language_check(doc(russian), cfg).startswith("script:")
    assert language_check(doc(russian), Config(scripts=["Latin", "Cyrillic"], min_stopwords=0)) is None
    french = ("Le soir tombait sur la ville et les enfants rentraient de l'école en courant dans les rues "
              "mouillées, que la pluie avait rendues brillantes.")
    assert language_check(doc(french), cfg).startswith("language:")
    assert language_check(doc(french), Config(languages=["en", "fr"])) is None
    # code has no stop words: only the script test applies
    assert language_check(doc("x = foo(bar)\n", kind="code"), cfg) is None
    assert language_check(doc("1234 5678 == != ()"), cfg).startswith("no_letters")


def test_gopher_keeps_prose():
    assert gopher_quality(PROSE, Config()) is None


@pytest.mark.parametrize("text, key", [
    ("Too short to be a document.", "too_short"),
    ("word " * 101, "too_long"),  # with max_words=100 below
    (" ".join(["incomprehensibilities"] * 30 + ["the"] * 30), "word_length"),
    (PROSE + " #tag" * 12, "symbols"),
    ("\n".join(f"- item number {i} of the list" for i in range(60)), "bullets"),
    ("\n".join(f"and then the long story of the old mill by the river went on {i}..." for i in range(60)), "ellipsis"),
    (PROSE + " " + " ".join(str(i) for i in range(40)), "alpha"),
    (PROSE + "\n" + "\n".join(["Subscribe to our newsletter today."] * 30), "dup_lines"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else "")
def test_gopher_rules_drop(text, key):
    cfg = Config(max_words=100) if key == "too_long" else Config()
    reason = gopher_quality(text, cfg)
    assert reason is not None and reason.split(":")[0] == key, reason


def test_gopher_symbol_rule_takes_hash_and_ellipsis_apart():
    extra = "apple bread cedar dune eagle fjord grape heron iris jade kelp lime moss nutmeg oak pine quail reed".split()
    text = PROSE + "".join(f" #{w}" for w in extra[:9]) + "".join(f" {w}..." for w in extra[9:]) + " The end."
    # 9 hashes and 9 ellipses in ~117 words: each under 0.1 per word, together over it
    n = len(text.split())
    assert 9 / n < 0.1 < 18 / n and gopher_quality(text, Config()) is None
    assert gopher_quality(PROSE + " #" * 14 + " The end.", Config()).startswith("symbols: 0.124 hash per word")


def test_gopher_repetition_rules():
    # A paragraph said three times: the 2nd and 3rd copies are repeated 5-grams, 2/3 of the characters.
    para = " ".join(PROSE.split()[:40])
    assert gopher_quality(" ".join([para] * 3), Config()).startswith("dup_ngram: repeated 5-grams cover 0.67")
    assert gopher_quality(PROSE + " click here" * 40, Config()).startswith("top_ngram: the most frequent 2-gram")
    # 1 of 4 lines repeats (0.25 <= 0.3), but it is long: 0.2+ of the characters sit in the repeat.
    line = ("When the storm finally passed, the whole village walked down to the harbour to count the boats, "
            "mend the nets, sweep the mud from the customs house and thank the keeper of the old lighthouse.")
    reason = gopher_quality(PROSE + "\n" + line + "\n" + line, Config())
    assert reason.startswith("dup_lines: 0.2") and "of characters in repeated lines" in reason


def test_ngram_repetition_hand_computed():
    # words a b a b a b, n=2: grams ab ba ab ba ab; "a b" occurs 3 times -> 3*2 of 6 characters;
    # repeats (after the first of each) start at 2, 3, 4 and cover words 2..5 -> 4 of 6 characters.
    top, dup = ngram_repetition("a b a b a b".split(), 2)
    assert top == pytest.approx(1.0) and dup == pytest.approx(4 / 6)
    top, dup = ngram_repetition("one two three four five".split(), 2)
    assert top == 0 and dup == 0


def test_c4_boilerplate_and_page_rules():
    text = "Real sentence here.\nThis site uses cookies to track you.\nEnable JavaScript to continue.\nshort line\n"
    assert strip_boilerplate(text, c4_lines=False) == "Real sentence here.\nshort line"
    assert strip_boilerplate(text, c4_lines=True) == "Real sentence here."
    assert c4_page("Lorem ipsum dolor sit amet.").startswith("c4: placeholder")
    assert c4_page("function() { return 1; }").startswith("c4: curly")
    assert c4_page("One. Two. Three.") == "c4: fewer than 5 sentences"
    assert c4_page("One. Two! Three? Four. Five.") is None


def test_code_quality():
    cfg = Config()
    good = "import os\n\n\ndef main():\n    return os.getcwd()\n"
    assert code_quality(good, cfg) is None
    assert code_quality("x = '" + "a" * 1200 + "'\n", cfg).startswith("long_line")
    assert code_quality("\n".join(["y = " + "b" * 150] * 10), cfg).startswith("line_length")
    assert code_quality("#" * 50 + "\n" + "\n".join(["x = (a + b) * -c / d"] * 3 + ["= - + * / " * 4] * 20), cfg).startswith("alnum")
    assert code_quality("# Auto-generated by gen.py; DO NOT EDIT\nX = 1\n", cfg).startswith("generated")
    assert code_quality("# Auto-generated by gen.py\nX = 1\n", Config(drop_generated=False)) is None


def test_lexicon_counts_words_phrases_and_symbols():
    lex = Lexicon(str(ASSETS / "toxic_words.txt"))
    assert lex.hits("a clean sentence") == (0, 3)
    assert lex.hits("Frak! smeg, and FRAK again") == (3, 5)
    assert lex.hits("you son of a motherless goat") == (1, 6)
    assert lex.hits("so angry 🤬 today") == (1, 3)
    assert lex.hits("frakking is not on the list") == (0, 6)  # whole words only


def test_toxicity_threshold():
    steps = TextSteps(Config(steps=["toxicity"], toxic_words=str(ASSETS / "toxic_words.txt"), max_toxic_frac=0.05))
    assert steps(doc(PROSE + " frak")) is None  # 1 in ~90 words
    step, reason = steps(doc("frak this smeg, gorram it all"))
    assert step == "toxicity" and reason.startswith("toxic: 3 listed terms in 6 words")


def test_toxicity_with_ldnoobw():
    if not LDNOOBW.exists():
        pytest.skip("../shared/datasets/ldnoobw/en is absent")
    steps = TextSteps(Config(steps=["toxicity"], toxic_words=str(LDNOOBW)))
    assert steps(doc(PROSE)) is None
    assert steps(doc("what a load of bullshit, you bastard")) is not None
    assert steps(doc("the class assertion passed; analysis of the assessment")) is None  # no substrings


def test_source_lists():
    block = SourceList(str(ASSETS / "blocklist.txt"), "blocklist")
    assert block.match(doc("x", url="https://spam.example/page")) == "spam.example"
    assert block.match(doc("x", url="http://www.spam.example/")) == "spam.example"  # subdomain
    assert block.match(doc("x", url="https://notspam.example/")) is None
    assert block.match(doc("x", url="https://ads.example.org/tracker/1")) == "https://ads.example.org/tracker/"
    assert block.match(doc("x", url="https://ads.example.org/home")) is None
    opt = SourceList(str(ASSETS / "optout.txt"), "opt-out list")
    assert opt.match({"id": "1", "text": "", "source": "books:author-x/novel", "meta": {}}) == "books:author-x/"
    assert opt.match({"id": "1", "text": "", "source": "forum:thread-42", "meta": {}}) == "forum:thread-42"
    assert opt.match({"id": "1", "text": "", "source": "forum:thread-421", "meta": {}}) is None


def test_text_steps_order_stats_and_edits():
    cfg = Config(steps=["normalize", "language", "quality", "pii"])
    steps = TextSteps(cfg)
    d = doc(PROSE.replace("Martha", "Martha (martha@example.org)") + "   \r\n")
    stats = {}
    assert steps(d, stats) is None
    assert "<|EMAIL|>" in d["text"] and d["meta"]["pii"] == {"email": 1}
    assert [s[0] for s in stats.values()] == [1, 1, 1, 1] and stats["pii"][2] == 1
    assert stats["normalize"][3] < stats["normalize"][1]  # trailing whitespace removed
    bad = doc("tiny")
    assert steps(bad, stats)[0] == "language"  # one stop-word-free line fails language before quality
    assert stats["quality"][0] == 1


def test_records_field_aware():
    cfg = Config(steps=["normalize", "pii", "toxicity"], toxic_words=str(ASSETS / "toxic_words.txt"), max_toxic_frac=0)
    steps = TextSteps(cfg)
    sft = {"messages": [{"role": "user", "content": "mail me at a@b.org"},
                        {"role": "assistant", "content": "Sure, or call (555) 234-5678."}]}
    assert [p for p, _ in record_texts(sft)] == ["messages[0].content", "messages[1].content"]
    scrubbed = map_record(sft, lambda t: scrub(t)[0])
    assert scrubbed["messages"][0]["content"] == "mail me at <|EMAIL|>"
    assert sft["messages"][0]["content"] == "mail me at a@b.org"  # the input record is not modified
    out, dropped = curate_record(sft, steps)
    assert dropped is None and out["messages"][1]["content"] == "Sure, or call <|PHONE|>."
    pair = {"prompt": "Say something", "chosen": "Hello there.", "rejected": "frak you"}
    out, dropped = curate_record(pair, steps)
    assert out is None and dropped[0] == "toxicity" and dropped[1].startswith("rejected: toxic")
    conversational = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "smeg"}],
                      "rejected": [{"role": "assistant", "content": "hello"}]}
    assert curate_record(conversational, steps)[1][1].startswith("chosen[0].content: toxic")
    rl = {"prompt": "What is 2+2? Reply to x@y.com", "answer": "4"}
    assert curate_record(rl, steps)[0] == {"prompt": "What is 2+2? Reply to <|EMAIL|>", "answer": "4"}
