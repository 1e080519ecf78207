"""The chat page in headless Chromium (Debian's chromium + chromedriver, driven by selenium; no browser is
downloaded): send a message and see a streamed answer, then compare two models and cast a vote that lands
in the votes JSONL that `ember arena` reads. Skips with the reason when chromium is not installed."""

import json
import shutil

import pytest

from ember.serve.api import Limits, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="headless browser test needs Debian's "
                                "chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture
def browser(tmp_path, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must never fetch a browser or driver of its own
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--no-first-run", "--window-size=1100,900", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_chat_stream_and_vote(kit, real_or_tiny, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    (model, tok), _ = real_or_tiny
    votes = tmp_path / "votes.jsonl"
    app = create_app([kit.served(model, tok, "alpha"), kit.served(model, tok, "beta")],
                     Limits(n_slots=4, max_tokens=64), votes_path=votes)
    wait = WebDriverWait(browser, 30)
    with kit.Server(app) as url:
        browser.get(url + "/")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 2)
        browser.find_element(By.CSS_SELECTOR, "#settings summary").click()  # open the sampling controls
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("40")
        browser.find_element(By.ID, "prompt").send_keys("Once upon a time")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text == "done")
        answer = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        assert answer.find_element(By.CSS_SELECTOR, ".text").text.strip()
        assert int(answer.get_attribute("data-chunks")) > 1  # the answer arrived in pieces (SSE), not at once

        browser.find_element(By.ID, "compare").click()
        browser.find_element(By.ID, "prompt").send_keys("Tell me a story about a cat.")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.ID, "votebar").is_displayed())
        a, b = browser.find_elements(By.CSS_SELECTOR, ".turn .msg.assistant .text")[-2:]
        answers = a.text, b.text
        browser.find_element(By.ID, "vote-b").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("vote recorded"))
        browser.save_screenshot(str(tmp_path / "chat.png"))

    row = json.loads(votes.read_text().splitlines()[-1])
    # the page draws which model answers on the left: the vote names whichever it was
    assert {row["a"], row["b"]} == {"alpha", "beta"} and (row["winner"], row["prompt"]) == ("b", "Tell me a story about a cat.")
    assert (row["answer_a"].strip(), row["answer_b"].strip()) == tuple(s.strip() for s in answers)
    assert row["seed_b"] == row["seed_a"] + 1
    from ember.eval.arena import read_votes

    assert read_votes(votes)[-1]["winner"] == "b"  # the arena stage reads what the page wrote


def test_a_chat_longer_than_the_context_drops_its_oldest_turns(kit, tiny, browser):
    """The tiny model holds 128 characters: by the third message the history no longer fits, the server says
    context_length_exceeded, and the page forgets the oldest exchange and asks again instead of failing."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model, tok = tiny
    app = create_app([kit.served(model, tok, "tiny")], Limits(n_slots=2, max_tokens=64))
    wait = WebDriverWait(browser, 30)
    with kit.Server(app) as url:
        browser.get(url + "/")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 1)
        browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
        browser.find_element(By.ID, "max_tokens").send_keys("30")
        notes = []
        for i in range(4):
            browser.find_element(By.ID, "prompt").send_keys(f"message number {i}, long enough to fill a context")
            browser.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done")
                       or d.find_elements(By.CSS_SELECTOR, ".msg.error"))
            assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error"), browser.find_element(By.ID, "status").text
            notes.append(browser.find_element(By.ID, "status").text)
        assert any("dropped its oldest" in n for n in notes), notes  # the user is told
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 4
        history = browser.execute_script("return history")
        assert len(history) < 8 and history[-2]["content"].startswith("message number 3")  # the oldest went
