"""The chat page in a real browser: Debian's Chromium, headless, driven by Playwright.

It loads the page from a real ``scripts.chat_web`` server (the looping scripted model of
helpers.chat_server: "Hi 你é🙂", a calculator call 2+3 -> 5, "!", again and again until
max_tokens), chats over several turns, regenerates, edits and resends, stops a long stream,
starts a new chat, and leaves screenshots in ``test-artifacts/`` (desktop and phone width).
The server requires an API key, which the page takes from ``/?key=``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO
from helpers.chat_server import (
    API_KEY,
    EXPRESSION,
    REPLY_TEXT,
    RESULT,
    Server,
    build_chat_checkpoint,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(
        "Debian's chromium is not installed: `make test` installs it (apt-get install "
        "chromium); the browser test was not run",
        allow_module_level=True,
    )

ARTIFACTS = REPO / "test-artifacts"
ONE_ROUND = 24  # tokens: the scripted reply once (21) and "Hi " again, cut at max_tokens
DONE = ".msg.assistant[data-state='done']"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("chat_page") / "base"
    build_chat_checkpoint(base, "loop", 8192, loop=True)
    running = Server(
        base,
        "--source",
        "base",
        "--max-tokens-limit",
        "8192",
        env={"NANOCHAT_API_KEY": API_KEY},
        name="page",
    )
    try:
        yield running.wait_ready()
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def open_page(browser, server, width: int, height: int, key: str | None = API_KEY):
    page = browser.new_page(viewport={"width": width, "height": height})
    foreign = []
    page.on("request", lambda r: None if r.url.startswith(server.url) else foreign.append(r.url))
    page.goto(server.url + ("/" if key is None else f"/?key={key}"))
    assert "key=" not in page.url  # kept for the tab, not left in the address bar
    page.wait_for_function("document.getElementById('model').textContent.startsWith('nanochat')")
    return page, foreign


def set_max_tokens(page, n: int) -> None:
    page.click("#settings summary")
    page.fill("#max-tokens", str(n))
    page.click("#settings summary")


def send(page, text: str) -> None:
    done_before = page.locator(DONE).count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(
        f'document.querySelectorAll("{DONE}").length > {done_before}'
        " && !document.querySelector(\".msg.assistant[data-state='streaming']\")"
    )


def test_chat_in_the_browser(browser, server):
    page, foreign = open_page(browser, server, 1280, 800)
    assert page.locator(".empty").is_visible()
    set_max_tokens(page, ONE_ROUND)

    # One turn: streamed text, then the tool call and its result drawn as their own blocks.
    send(page, "What is 2+3?")
    reply = page.locator(".msg.assistant").last
    assert reply.get_attribute("data-finish") == "length"
    texts = reply.locator(".part.text").all_inner_texts()
    assert texts[0] == REPLY_TEXT and texts[1].startswith("!Hi")
    assert reply.locator(".tool.python pre").inner_text() == EXPRESSION
    assert reply.locator(".tool.output pre").inner_text() == RESULT
    assert "```" not in reply.inner_text()  # the inline form is for plain clients only

    # A second turn sends the history back, tool parts included.
    send(page, "And 3+4?")
    assert page.locator(".msg.user").count() == 2 and page.locator(DONE).count() == 2

    # Regenerate replaces the last reply.
    page.locator(".regenerate").click()
    page.wait_for_selector(f"{DONE} >> nth=1")
    assert page.locator(".msg.assistant").count() == 2

    # Edit the first message and resend: the conversation restarts from there.
    page.locator(".msg.user .edit").first.click()
    page.fill(".edit-box textarea", "What is 5+5?")
    page.locator(".edit-box .save").click()
    page.wait_for_function(
        "document.querySelectorAll('.msg').length === 2"
        f' && document.querySelectorAll("{DONE}").length === 1'
    )
    assert page.locator(".msg.user .bubble").inner_text() == "What is 5+5?"

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat_page.png"))

    # A long reply streams in piece by piece; Stop ends it and frees the server.
    set_max_tokens(page, 8000)
    page.fill("#input", "Tell me a long story.")
    page.press("#input", "Enter")
    streaming = ".msg.assistant[data-state='streaming']"
    page.wait_for_function(
        f'(document.querySelector("{streaming} .bubble") || {{}}).textContent?.length > 40'
    )
    assert page.locator("#send").inner_text() == "Stop"
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-state='stopped']")
    stopped = page.locator(".msg.assistant").last.inner_text()
    assert 40 < len(stopped) < 8000

    # New chat empties the page.
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.locator(".empty").is_visible()
    assert foreign == [], f"the page fetched from elsewhere: {foreign}"
    page.close()


def test_phone_width(browser, server):
    page, foreign = open_page(browser, server, 390, 844)
    set_max_tokens(page, ONE_ROUND)
    send(page, "Hello from a phone: what is 2+3?")
    assert page.locator(".tool.output pre").inner_text() == RESULT
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width} px wide at a 390 px viewport"
    box = page.locator("#send").bounding_box()
    assert box is not None and box["x"] + box["width"] <= 390
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat_page_phone.png"))
    assert foreign == []
    assert re.match(r"nanochat-base-loop", page.locator("#model").inner_text())
    page.close()


def test_without_the_key_the_page_says_how_to_get_in(browser, server):
    page, _ = open_page(browser, server, 800, 600, key=None)
    page.fill("#input", "hello?")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-state='error']")
    error = page.locator(".msg.assistant .error").inner_text()
    assert "API key" in error and "?key=" in error
    page.close()
