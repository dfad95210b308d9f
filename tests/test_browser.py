"""The browser client end to end: Debian's Chromium (driven by Playwright) with a fake microphone that plays a
spoken WAV, against a real `emote serve` running the solid-colour test model (256x256 frames) on loopback."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import speech_like, write_wav
from server_fixtures import get_json, make_test_model, read_token, running_server

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed (make setup installs it)"),
]

CHROMIUM_ARGS = [
    "--no-sandbox",  # we run as root in CI containers
    "--headless=new",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
]


def speech_wav(path: Path) -> Path:
    """A spoken sentence as 16-bit PCM WAV: espeak-ng where present, else a synthetic speech-like signal."""
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-w", str(path), "Hello there. I am a talking portrait, streaming live."],
                       check=True, capture_output=True, timeout=30)
        return path
    return write_wav(path, speech_like(3.0))


FRAME_SIZE = 256


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser-server")
    # One slot: the second page in test_server_full must be turned away.
    with running_server(tmp, "--max-sessions", "1", model=make_test_model(tmp / "model", FRAME_SIZE)) as (base_url, _):
        yield base_url


@pytest.fixture(scope="module")
def playwright():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="module")
def browser(playwright, tmp_path_factory):
    wav = speech_wav(tmp_path_factory.mktemp("chromium") / "speech.wav")
    browser = playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        args=[*CHROMIUM_ARGS, "--use-fake-ui-for-media-stream", f"--use-file-for-fake-audio-capture={wav}"],
    )
    yield browser
    browser.close()


@pytest.fixture
def open_page(browser, server):
    contexts = []

    def open_(browser=browser, loaded="#avatars input[value='default']"):
        context = browser.new_context()
        contexts.append(context)
        page = context.new_page()
        page.goto(server + "/")
        page.wait_for_selector(loaded)  # by default: config and avatars loaded
        return page

    yield open_
    for context in contexts:
        context.close()


VIDEO_PROGRESS = """() => {
    const video = document.getElementById('video');
    return {width: video.videoWidth, height: video.videoHeight, time: video.currentTime, frames: window.__frames || 0};
}"""

COUNT_FRAMES = """() => {
    const video = document.getElementById('video');
    window.__frames = 0;
    const tick = () => { window.__frames += 1; video.requestVideoFrameCallback(tick); };
    video.requestVideoFrameCallback(tick);
}"""

FRAMES_DECODED = """async () => {
    let decoded = 0;
    (await window.emote.pc.getStats()).forEach((s) => {
        if (s.type === 'inbound-rtp' && s.kind === 'video') decoded = s.framesDecoded;
    });
    return decoded;
}"""

KEYFRAMES_DECODED = """async () => {
    let keyframes = 0;
    (await window.emote.pc.getStats()).forEach((s) => {
        if (s.type === 'inbound-rtp' && s.kind === 'video') keyframes = s.keyFramesDecoded;
    });
    return keyframes;
}"""


def start_session(page) -> None:
    page.get_by_role("button", name="Start", exact=True).click()
    page.wait_for_function("window.emote.state === 'live'", timeout=30_000)


def test_start_plays_the_avatar(open_page):
    page = open_page()
    start_session(page)
    assert "Live" in page.locator("#status").inner_text()
    assert page.get_by_role("button", name="Stop").is_enabled()
    assert page.get_by_role("button", name="Interrupt").is_enabled()

    page.wait_for_function("document.getElementById('video').videoWidth > 0", timeout=30_000)
    page.evaluate(COUNT_FRAMES)
    first, decoded_first = page.evaluate(VIDEO_PROGRESS), page.evaluate(FRAMES_DECODED)
    page.wait_for_timeout(3000)
    last, decoded_last = page.evaluate(VIDEO_PROGRESS), page.evaluate(FRAMES_DECODED)

    assert (last["width"], last["height"]) == (FRAME_SIZE, FRAME_SIZE)  # the model's spec, as /api/config says
    box = page.evaluate("(() => { const r = document.querySelector('.video-box').getBoundingClientRect(); "
                        "return r.width / r.height; })()")
    assert abs(box - 1) < 0.01
    assert last["time"] > first["time"] + 1.0, (first, last)
    assert last["frames"] >= 15, f"only {last['frames']} frames painted in 3 s"
    assert decoded_last - decoded_first >= 15, (decoded_first, decoded_last)
    # The overlay shows a measured frame rate once getStats has two samples.
    page.wait_for_function("document.getElementById('stat-fps').textContent !== '–'", timeout=5_000)
    # The server forces a keyframe every 2 s (aiortc's own GOP is 3000 frames), so a lost one heals quickly.
    keyframes_first = page.evaluate(KEYFRAMES_DECODED)
    page.wait_for_timeout(4500)
    assert page.evaluate(KEYFRAMES_DECODED) - keyframes_first >= 2

    page.get_by_role("button", name="Interrupt").click()
    page.get_by_role("button", name="Stop").click()
    page.wait_for_function("window.emote.state === 'idle'", timeout=5_000)
    assert page.get_by_role("button", name="Start", exact=True).is_enabled()


def wait_for_no_sessions(base_url: str, timeout: float = 10.0) -> None:
    """A page that pressed Stop frees its slot as soon as the server sees the WebSocket close."""
    deadline = time.monotonic() + timeout
    while get_json(f"{base_url}/healthz")["sessions"] and time.monotonic() < deadline:
        time.sleep(0.1)


def test_server_full_is_explained(open_page, server):
    wait_for_no_sessions(server)
    first = open_page()
    start_session(first)

    second = open_page()
    second.get_by_role("button", name="Start", exact=True).click()
    status = second.locator("#status")
    second.wait_for_function("window.emote.state === 'idle' && document.getElementById('status').dataset.kind === 'error'",
                             timeout=30_000)
    assert "busy" in status.inner_text()
    assert second.get_by_role("button", name="Start", exact=True).is_enabled()

    first.get_by_role("button", name="Stop").click()
    first.wait_for_function("window.emote.state === 'idle'", timeout=5_000)


def test_denied_microphone_is_explained(playwright, open_page):
    # Without --use-fake-ui-for-media-stream, headless Chromium refuses the permission prompt: NotAllowedError.
    strict = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    try:
        page = open_page(browser=strict)
        page.get_by_role("button", name="Start", exact=True).click()
        page.wait_for_function("document.getElementById('status').dataset.kind === 'error'", timeout=10_000)
        assert "Microphone access was denied" in page.locator("#status").inner_text()
        assert page.evaluate("window.emote.state") == "idle"
    finally:
        strict.close()


@pytest.fixture(scope="module")
def secured_server(tmp_path_factory):
    """The quickstart: `emote serve` without --token keeps one in its data dir and prints the page's URL with it."""
    tmp = tmp_path_factory.mktemp("secured-browser-server")
    with running_server(tmp, "--max-sessions", "1", model=make_test_model(tmp / "model", FRAME_SIZE),
                        auth=True) as (base_url, _):
        printed = [line.split()[1] for line in (tmp / "server.log").read_text().splitlines() if line.startswith("Open ")]
        assert printed == [f"{base_url}/#token={read_token(tmp)}"]
        yield base_url, printed[0]


def test_the_printed_url_opens_a_working_page(browser, secured_server):
    base_url, printed = secured_server
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(printed)
        page.wait_for_selector("#avatars input[value='default']")
        assert page.evaluate("location.href") == base_url + "/", "the token leaves the address bar"
        assert page.is_hidden("#token-box")
        # Portraits need the token too: fetched with the header, shown as blob: URLs.
        page.wait_for_function("[...document.querySelectorAll('#avatars img')].every((i) => i.src.startsWith('blob:')"
                               " && i.naturalWidth > 0)", timeout=10_000)
        start_session(page)
        page.wait_for_function("document.getElementById('video').videoWidth > 0", timeout=30_000)
        page.get_by_role("button", name="Stop").click()
        page.wait_for_function("window.emote.state === 'idle'", timeout=5_000)
        page.goto(base_url + "/")  # later visits: the page kept the token
        page.wait_for_selector("#avatars input[value='default']")
    finally:
        context.close()


def test_missing_token_is_explained(browser, secured_server):
    base_url, printed = secured_server
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(base_url + "/")
        page.wait_for_function("document.getElementById('status').dataset.kind === 'error'", timeout=10_000)
        assert "needs an access token" in page.locator("#status").inner_text()
        box = page.get_by_label("This server needs a token")
        assert box.is_visible()
        box.fill("a-wrong-token-0123456789")
        page.get_by_role("button", name="Save").click()
        page.wait_for_function("document.getElementById('status').textContent.includes('refused')", timeout=10_000)
        box.fill(printed.split("#token=")[1])
        page.get_by_role("button", name="Save").click()
        page.wait_for_selector("#avatars input[value='default']")
        assert page.is_hidden("#token-box")
    finally:
        context.close()


def test_the_visible_badge_is_off_until_asked_for_and_remembered(open_page):
    page = open_page()
    assert page.is_hidden("#badge")
    page.check("#show-badge")
    assert page.is_visible("#badge") and page.inner_text("#badge") == "AI-generated"
    page.reload()
    page.wait_for_selector("#avatars input[value='default']")
    assert page.is_visible("#badge"), "the viewer's choice is kept"
    page.uncheck("#show-badge")
    assert page.is_hidden("#badge")
