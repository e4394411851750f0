"""serve.py's chat page (GET /): served without the API key, self-contained (no other origin), and in a real
headless browser (Debian's chromium + chromium-driver, driven by selenium) it streams greedy answers equal to
the library's, keeping the conversation's history; for a base model it continues the text."""

import shutil
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from gpt.chat import END, SPECIAL, answer_stop_ids, chat_tokenizer, encode_chat  # noqa: E402
from gpt.serve import ChatText, Engine, create_app  # noqa: E402
from gpt.tokenizer import CharTokenizer  # noqa: E402
from test_openai_api import CHARS, KEY, _save, _start, base_model, chat_model, library_greedy  # noqa: E402

MAX_TOKENS = 20


def _app(model, tok) -> TestClient:
    return TestClient(create_app(Engine(model, tok), api_key=KEY, model_name="m"))


def test_page_needs_no_key_and_loads_nothing_from_elsewhere():
    c = _app(chat_model(), chat_tokenizer(CharTokenizer(CHARS)))
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "/v1/chat/completions" in r.text and "/v1/completions" in r.text
    for remote in ("http://", "https://", "//cdn"):  # works offline: nothing fetched from another host
        assert remote not in r.text
    assert c.get("/v1/models").status_code == 401  # the API calls still need the key
    assert c.get("/health").json()["chat"] is True and c.get("/health").json()["model"] == "m"
    assert _app(base_model(), CharTokenizer(CHARS)).get("/health").json()["chat"] is False


# --- a real browser -------------------------------------------------------------------------------------------

def _driver():
    """A headless chromium, or a skip naming what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no headless browser: " + ", ".join(
            name for name, path in [("chromium", browser), ("chromedriver", driver)] if path is None)
            + " not found (apt-get install -y chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,800"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.fixture(scope="module")
def browser():
    d = _driver()
    try:
        yield d
    finally:
        d.quit()


def _wait(condition, what: str, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _say(d, text: str) -> str:
    """Type `text` into the page and press Enter; -> the answer once streamed (its element changed while the
    pieces arrived, and more than one piece came)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    before = len(d.find_elements(By.CSS_SELECTOR, ".assistant"))
    box = d.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    answer = _wait(lambda: d.find_elements(By.CSS_SELECTOR, ".assistant")[before:], "the answer element")[0]
    _wait(lambda: answer.text, "streamed text in the answer")
    _wait(lambda: answer.get_attribute("data-done") == "true",
          f"the end of the answer (status: {d.find_element(By.ID, 'status').text!r})")
    assert int(answer.get_attribute("data-pieces")) > 1  # streamed piece by piece, not in one go
    return answer.get_attribute("textContent")


def _reply(d, text: str) -> str:
    """Type `text` and press Enter; -> the answer's text once its stream ended (it may be empty)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    before = len(d.find_elements(By.CSS_SELECTOR, ".assistant"))
    box = d.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    answer = _wait(lambda: d.find_elements(By.CSS_SELECTOR, ".assistant")[before:], "the answer element")[0]
    _wait(lambda: answer.get_attribute("data-done") == "true",
          f"the end of the answer (status: {d.find_element(By.ID, 'status').text!r})")
    return answer.get_attribute("textContent")


def _open(d, url: str, screenshot) -> None:
    from selenium.webdriver.common.by import By

    d.get(url + "/")
    _wait(lambda: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle", "the page to load")
    for field, value in [("key", KEY), ("temperature", "0"), ("max-tokens", str(MAX_TOKENS))]:
        box = d.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    d.save_screenshot(str(screenshot))


@pytest.mark.slow
def test_browser_chat_streams_the_library_answers_with_history(browser, tmp_path):
    from selenium.webdriver.common.by import By

    model, tok = chat_model(), chat_tokenizer(CharTokenizer(CHARS))
    proc, url = _start(_save(model, {"type": "char", "chars": CHARS, "special": SPECIAL}, tmp_path / "chat.pt"),
                       "chat")
    try:
        _open(browser, url, tmp_path / "chat-empty.png")
        assert "chat model" in browser.find_element(By.ID, "kind").text
        turns, got = ["Hello there", "And then?"], []  # both answers show text (not only special tokens)
        history: list[dict] = []
        for text in turns:
            got.append(_say(browser, text))
            history.append({"role": "user", "content": text})
            want = ChatText(tok).decode(library_greedy(model, encode_chat(tok, history, generation_prompt=True)[0],
                                             MAX_TOKENS, answer_stop_ids(tok)))
            assert got[-1] == want  # the second turn's prompt holds the first turn: the whole history
            history.append({"role": "assistant", "content": want})
        alone = ChatText(tok).decode(library_greedy(model, encode_chat(tok, history[2:3], generation_prompt=True)[0],
                                          MAX_TOKENS, answer_stop_ids(tok)))
        assert alone != got[1]  # so the check above tells history from no history
        browser.save_screenshot(str(tmp_path / "chat.png"))
        assert (tmp_path / "chat.png").stat().st_size > 0
        users = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".user")]
        assert users == turns
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_browser_long_conversation_leaves_its_oldest_turns_out_to_fit_the_server(browser, tmp_path):
    """A server with limits.max_prompt_chars=40 and limits.max_new_tokens=16: the page's max tokens are capped to
    16 (the field asks for 20), and once the conversation's text is over 40 characters the oldest turns are left
    out of the request (the server would refuse it), so every turn is answered: the library's greedy answer to
    the turns that fit."""
    from selenium.webdriver.common.by import By

    model, tok = chat_model(), chat_tokenizer(CharTokenizer(CHARS))
    proc, url = _start(_save(model, {"type": "char", "chars": CHARS, "special": SPECIAL}, tmp_path / "chat.pt"),
                       "chat", "limits.max_prompt_chars=40", "limits.max_new_tokens=16")
    try:
        browser.get(url + "/")
        _wait(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle", "the page")
        assert browser.find_element(By.ID, "max-tokens").get_attribute("value") == "16"
        _open(browser, url, tmp_path / "long-empty.png")  # sets max tokens to 20, over the server's 16
        history: list[dict] = []
        dropped = 0
        for text in ["Hello there", "And then?", "Tell me more", "Why?"]:
            sent = history + [{"role": "user", "content": text}]
            while len(sent) > 1 and sum(len(m["content"]) for m in sent) > 40:  # the page's rule
                sent, dropped = sent[2:] if len(sent) > 2 else sent[1:], dropped + 1
            want = ChatText(tok).decode(library_greedy(model, encode_chat(tok, sent, generation_prompt=True)[0],
                                                       16, answer_stop_ids(tok)))
            assert _reply(browser, text) == want  # (this random model's answer may be its special tokens only)
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": want}]
        assert dropped and browser.find_element(By.ID, "status").text == ""
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".user")] == [
            m["content"] for m in history[::2]]  # every turn answered: none given back after an error
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_browser_base_model_continues_the_text(browser, tmp_path):
    from selenium.webdriver.common.by import By

    model, tok = base_model(), CharTokenizer(CHARS)
    proc, url = _start(_save(model, {"type": "char", "chars": CHARS}, tmp_path / "base.pt"), "base")
    try:
        _open(browser, url, tmp_path / "base-empty.png")
        assert "base model" in browser.find_element(By.ID, "kind").text
        first = _say(browser, "ROMEO:")
        assert first == tok.decode(library_greedy(model, tok.encode("ROMEO:"), MAX_TOKENS))
        second = _say(browser, " and")  # continues the whole text so far
        assert second == tok.decode(library_greedy(model, tok.encode("ROMEO:" + first + " and"), MAX_TOKENS))
        browser.save_screenshot(str(tmp_path / "base.png"))
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_browser_without_the_key_says_so(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    proc, url = _start(_save(base_model(), {"type": "char", "chars": CHARS}, tmp_path / "base.pt"), "base")
    try:
        browser.get(url + "/")
        _wait(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle", "the page")
        browser.find_element(By.ID, "key").clear()
        box = browser.find_element(By.ID, "prompt")
        box.send_keys("ROMEO:")
        box.send_keys(Keys.ENTER)
        status = _wait(lambda: browser.find_element(By.ID, "status").text, "the error line")
        assert "API key" in status
        assert browser.find_elements(By.CSS_SELECTOR, ".assistant") == []
        assert box.get_attribute("value") == "ROMEO:"  # the text is given back to send again
    finally:
        proc.terminate()
        proc.wait(10)
