"""`bcjax serve` in a real browser: Debian's headless Chromium, driven by playwright-python, loads
the page, sees frames arrive, switches the prompt, sees the switch latency, and saves a screenshot."""

import os
import re
import shutil
import threading
import time

import pytest

CHROMIUM = os.environ.get("BCJAX_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.isfile(CHROMIUM),
                                                   reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")]


def _wait(page, js: str, timeout_s: float = 60.0, what: str = ""):
    """Poll a JavaScript expression until it is truthy; its value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = page.evaluate(js)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what or js}")


def test_page_streams_switches_and_shows_the_latency(tmp_path):
    from playwright.sync_api import sync_playwright
    from serve_helpers import served

    s = served()
    shot = os.environ.get("BCJAX_SCREENSHOT") or str(tmp_path / "serve.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 960, "height": 720})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(s.url + "/")
            _wait(page, "document.getElementById('conn').textContent === 'online' && window.bcjax.model",
                  what="the hello")
            assert page.input_value("#prompt") == "red south-east fast"
            # the toy world has no VAE: the decoder control is disabled, and the page says why
            assert page.is_disabled("#decoder") and "no VAE" in page.text_content("#decoder-note")
            page.fill("#prompt", "red so")  # completion from the world's vocabulary
            options = page.eval_on_selector_all("#completions option", "os => os.map(o => o.value)")
            assert options == ["red south-east", "red south", "red south-west"]
            page.fill("#prompt", "red south-east fast")
            assert page.locator("#strip .cell").count() == 5  # 4 denoising stages + the clean pass
            page.select_option("#stagger", "P4")
            page.select_option("#fps", "30")
            page.click("#start")
            # the first start compiles: the page says so, counting seconds, then runs
            _wait(page, "window.bcjax.states.includes('compiling')", what="the compiling state")
            assert page.evaluate("window.bcjax.compilingShown[0]").startswith("compiling… ")
            _wait(page, "window.bcjax.phase === 'running'", what="running after the compile")
            assert page.text_content("#compile") != "–"
            _wait(page, "document.getElementById('decode-ms').textContent === 'none (no VAE)'", what="no decode figure")
            _wait(page, "window.bcjax.framesDrawn >= 4", what="frames drawn")
            first = page.evaluate("document.getElementById('video').toDataURL()")
            _wait(page, f"document.getElementById('video').toDataURL() !== {first!r}", what="the canvas to change")
            # the strip shows P4's five blocks at five noise levels
            _wait(page, "[...document.querySelectorAll('#strip .blk')].filter(b => b.textContent).length === 5",
                  what="a full cascade in the strip")
            # a bad prompt: a message, and the stream goes on under the old prompt
            drawn = page.evaluate("window.bcjax.framesDrawn")
            controls = page.locator("#start").bounding_box()
            page.fill("#prompt", "red sideways fast")
            page.press("#prompt", "Enter")
            _wait(page, "document.getElementById('message').textContent.includes('unknown word')",
                  what="the error message")
            assert page.locator("#start").bounding_box() == controls, "the error line moved the controls"
            _wait(page, f"window.bcjax.framesDrawn > {drawn + 3}", what="frames after the bad prompt")
            assert page.text_content("#latency") == "–"
            # a good one: the switch latency appears
            page.fill("#prompt", "red west slow")
            page.press("#prompt", "Enter")
            latency = _wait(page, "(t => /^\\d+ ms$/.test(t) && t)(document.getElementById('latency').textContent)",
                            what="the switch latency")
            assert page.text_content("#message") == ""
            assert re.fullmatch(r"\d+ ms", page.text_content("#latency-touched"))  # the new text's first visible block
            ms = int(re.match(r"(\d+)", latency).group(1))
            assert 0 < ms < 30_000
            assert page.locator("#switches tbody tr").count() == 1
            assert page.evaluate("window.bcjax.latencies[0].policy") == "no-recache"
            page.screenshot(path=shot)
            page.click("#stop")
            _wait(page, "document.getElementById('state').textContent.startsWith('stopped')", what="stopped")
            time.sleep(0.3)  # frames already queued may still arrive
            blocks = page.evaluate("window.bcjax.blocks")
            time.sleep(0.5)
            assert page.evaluate("window.bcjax.blocks") == blocks, "blocks kept coming after stop"
            assert page.text_content("#bps") == "–" and page.text_content("#latency") == "–"  # no stale figures
            # stop, another prompt, start: that prompt runs, in a new stream
            stream = page.evaluate("window.bcjax.stream")
            page.fill("#prompt", "red north fast")
            page.click("#start")
            _wait(page, f"window.bcjax.stream === {stream + 1} && window.bcjax.blocks >= 2", what="the new stream")
            assert page.evaluate("window.bcjax.prompt") == "red north fast"
            assert page.text_content("#where").endswith("prompt 0")
            page.click("#reset")
            _wait(page, "window.bcjax.stream === null && document.getElementById('bps').textContent === '–'",
                  what="the page reset")
            assert not errors, errors
        finally:
            browser.close()
    assert os.path.getsize(shot) > 10_000
    import urllib.request

    with urllib.request.urlopen(s.url + "/favicon.ico", timeout=10) as icon:
        assert icon.status == 200 and icon.read().startswith(b"<svg")


def test_page_picks_taehv_for_a_checkpoint_and_shows_its_decode_time(tmp_path):
    """A tiny checkpoint with a TAEHV: the page offers its decoders, streams under TAEHV and shows
    each block's decode time; the screenshot (BCJAX_SCREENSHOT_TAEHV) is docs/serve-taehv.png."""
    from playwright.sync_api import sync_playwright
    from serve_helpers import start_server, tiny_checkpoint

    from bcjax.serve import CheckpointBackend

    s = start_server(CheckpointBackend(tiny_checkpoint(tmp_path), video_hw=(96, 160)))
    shot = os.environ.get("BCJAX_SCREENSHOT_TAEHV") or str(tmp_path / "serve-taehv.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 960, "height": 640})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(s.url + "/")
            _wait(page, "document.getElementById('conn').textContent === 'online' && window.bcjax.model",
                  what="the hello")
            assert page.eval_on_selector_all("#decoder option", "os => os.map(o => o.value)") == ["wan", "taehv"]
            assert page.input_value("#decoder") == "taehv" and not page.is_disabled("#decoder")
            page.select_option("#stagger", "P2")
            page.select_option("#fps", "8")
            page.fill("#prompt", "a red fox runs")  # the tiny text encoder reads 16 tokens
            page.click("#start")
            decode = _wait(page, "(t => /^\\d+\\.\\d ms · taehv$/.test(t) && t)"
                                 "(document.getElementById('decode-ms').textContent)",
                           timeout_s=180, what="the TAEHV decode time")
            assert page.evaluate("window.bcjax.settings.decoder") == "taehv"
            assert float(decode.split()[0]) > 0
            _wait(page, "window.bcjax.framesDrawn >= 6 && /^\\d/.test(document.getElementById('bps').textContent)",
                  timeout_s=120, what="frames drawn")
            page.screenshot(path=shot)
            page.click("#reset")
            assert not errors, errors
        finally:
            browser.close()
    assert os.path.getsize(shot) > 5_000
    # the tab's thread ends with its socket, after the decode it is in (seconds on CPU): one still
    # inside XLA when the interpreter exits would abort it
    deadline = time.monotonic() + 60
    while any(t.name.startswith("bcjax-tab-") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.1)
