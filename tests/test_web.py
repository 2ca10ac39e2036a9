"""The web chat page in headless Chromium (Playwright driving Debian's `chromium`).

Type a message, see the answer stream in (the text grows over several updates and ends equal to
the library's answer), parameters reach the server, and the conversation survives a reload.
Skips cleanly when Playwright or /usr/bin/chromium is missing.
"""

from __future__ import annotations

import os
import shutil

import pytest

sync_api = pytest.importorskip("playwright.sync_api")

import scratchlm  # noqa: E402
from scratchlm.infer.server import create_app  # noqa: E402
from scratchlm.runs import load_run  # noqa: E402

from server_helpers import live_server, make_run, slow_down  # noqa: E402

CHROMIUM = os.environ.get("SCRATCHLM_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) or shutil.which("chromium")),
                                reason=f"no chromium at {CHROMIUM}")


@pytest.fixture(scope="module")
def page_and_server(tmp_path_factory):
    run_dir = make_run(tmp_path_factory.mktemp("web") / "web-chat", chat_tokens=True)
    run = load_run(run_dir)
    hook = slow_down(run.model, 0.03)  # so the answer arrives over many network reads
    app = create_app(run.model, run.tokenizer, model_id="web-chat", api_key="k3y")
    with live_server(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
                                    args=ARGS, headless=True)
        page = browser.new_page()
        yield page, url, run_dir
        browser.close()
    hook.remove()


def test_typed_message_gets_a_streamed_answer(page_and_server):
    page, url, run_dir = page_and_server
    page.goto(url + "/")
    page.fill("#api-key", "k3y")
    page.dispatch_event("#api-key", "change")
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "change")
    page.fill("#max_tokens", "20")
    page.dispatch_event("#max_tokens", "change")
    # count how many times the answer's text changes while it streams
    page.evaluate("""() => {
        window.__updates = 0;
        new MutationObserver(() => window.__updates++).observe(
            document.getElementById('messages'), {subtree: true, characterData: true, childList: true});
    }""")
    page.fill("#input", "Hello there! How are you?")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelector('#status').textContent.includes('tokens')", timeout=60_000)
    answer = page.inner_text(".message.assistant .content")
    expected = scratchlm.load(run_dir).chat([{"role": "user", "content": "Hello there! How are you?"}],
                                            max_new_tokens=20, temperature=0)
    assert answer == expected.strip() or answer == expected
    assert page.evaluate("window.__updates") > 3  # it streamed in, not all at once
    assert page.inner_text(".message.user .content") == "Hello there! How are you?"

    # history: the conversation is listed and survives a reload
    page.reload()
    page.wait_for_selector(".message.assistant")
    assert page.inner_text(".message.user .content") == "Hello there! How are you?"
    assert "Hello there" in page.inner_text("#history")
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    assert page.locator("#history li").count() == 2


def test_wrong_key_shows_an_error(page_and_server):
    page, url, _ = page_and_server
    page.goto(url + "/")
    page.fill("#api-key", "wrong")
    page.dispatch_event("#api-key", "change")
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    page.wait_for_selector(".message.error", timeout=30_000)
    assert "API key" in page.inner_text(".message.error")
