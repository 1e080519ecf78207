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
    assert (row["a"], row["b"], row["winner"], row["prompt"]) == ("alpha", "beta", "b", "Tell me a story about a cat.")
    assert (row["answer_a"].strip(), row["answer_b"].strip()) == tuple(s.strip() for s in answers)
    assert row["seed_b"] == row["seed_a"] + 1
    from ember.eval.arena import read_votes

    assert read_votes(votes)[-1]["winner"] == "b"  # the arena stage reads what the page wrote
