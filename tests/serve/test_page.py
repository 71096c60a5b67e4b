"""The chat page in real headless Chromium (Debian's, driven by selenium through Debian's
chromedriver): attach a generated image, ask, watch the answer stream in; grounding boxes draw
over the image. Screenshots land in tests/serve/artifacts/ (git-ignored).
Install the browser with scripts/setup_browser.sh."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).parent / "artifacts"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian chromium + chromium-driver not installed (run scripts/setup_browser.sh)",
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium not installed (run scripts/setup_browser.sh)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        # Headless, and no background traffic: this machine's network is closed.
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1100,900",
    ):  # fmt: skip
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def scene(path: Path) -> Path:
    """A picture with two shapes, for the model to look at and for boxes to frame."""
    image = Image.new("RGB", (320, 240), (235, 240, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((30, 40, 130, 150), fill=(220, 60, 60))
    draw.ellipse((180, 90, 290, 200), fill=(60, 120, 220))
    image.save(path)
    return path


def test_attach_ask_and_see_the_answer_stream_in(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "model").text == server.app.state.config.model_name)
    browser.find_element(By.ID, "file").send_keys(str(scene(tmp_path / "scene.png")))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments .chip img"))
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("40")
    # Count the answer's updates: a streamed answer grows in many steps, not in one.
    browser.execute_script(
        "window.updates = 0; new MutationObserver(() => window.updates++).observe("
        "document.getElementById('log'), {subtree: true, childList: true, characterData: true});"
    )
    browser.find_element(By.ID, "prompt").send_keys("What shapes do you see?")
    browser.find_element(By.ID, "send").click()
    answer = wait.until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done]")
    )[0]
    assert answer.text.strip()
    assert browser.execute_script("return window.updates") > 10
    user = browser.find_element(By.CSS_SELECTOR, ".msg.user")
    assert "What shapes" in user.text and user.find_elements(By.CSS_SELECTOR, ".media img")
    assert browser.execute_script("return qwen2vl.state.messages.length") == 2
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "chat_page.png"))


def test_grounding_boxes_are_drawn_over_the_image(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    if "qwen2vl" not in browser.execute_script("return Object.keys(window)"):
        browser.get(server.url + "/")
    text = (
        "<|object_ref_start|>red square<|object_ref_end|><|box_start|>(94,167),(406,625)"
        "<|box_end|> and <|object_ref_start|>blue disc<|object_ref_end|>"
        "<|box_start|>(563,375),(906,833)<|box_end|>"
    )
    objects = browser.execute_script("return qwen2vl.parseGrounding(arguments[0])", text)
    assert [o["label"] for o in objects] == ["red square", "blue disc"]
    assert objects[0]["boxes"] == [[94, 167, 406, 625]]
    uri = server_data_uri(scene(tmp_path / "scene.png"))
    boxes = browser.execute_async_script(
        "const [text, uri, done] = arguments;"
        "const el = document.createElement('div'); el.className = 'msg assistant';"
        "document.getElementById('log').append(el);"
        "qwen2vl.renderAnswer(el, text);"
        "qwen2vl.drawBoxes(el, uri, qwen2vl.parseGrounding(text))"
        "  .then((figure) => done(figure.dataset.boxes));",
        text,
        uri,
    )
    assert boxes == "2"
    shown = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .tag")
    assert [s.text for s in shown[-4:]][::2] == ["red square", "blue disc"]
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "grounding_boxes.png"))


def server_data_uri(path: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
