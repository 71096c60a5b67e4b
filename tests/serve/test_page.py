"""The chat page in real headless Chromium (Debian's, driven by selenium through Debian's
chromedriver): attach a generated image, ask, watch the answer stream in; grounding boxes draw
over the image; images show large and open full size on click; an animated GIF goes as a video;
the embedded default model's empty chat says what it knows. Screenshots land in
tests/serve/artifacts/ (git-ignored).
Install the browser with scripts/setup_browser.sh."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from qwen2vl.grounding import objects_in_pixels, parse_grounding

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
    path = scene(tmp_path / "scene.png")
    width, height = Image.open(path).size
    grounding = {
        "image": 0,
        "width": width,
        "height": height,
        "objects": objects_in_pixels(parse_grounding(text), width, height),
    }
    uri = server_data_uri(path)
    # Alpha of the drawn canvas on the first box's left edge and inside it (the server's pixels
    # scaled to the displayed size).
    boxes, on_edge, inside = browser.execute_async_script(
        "const [text, uri, grounding, done] = arguments;"
        "const el = document.createElement('div'); el.className = 'msg assistant';"
        "document.getElementById('log').append(el);"
        "qwen2vl.renderAnswer(el, text);"
        "qwen2vl.showImage(el, uri, grounding).then((figure) => {"
        "  const c = figure.querySelector('canvas');"
        "  const [x1, y1, x2, y2] = grounding.objects[0].boxes[0];"
        "  const [sx, sy] = [c.width / grounding.width, c.height / grounding.height];"
        "  const alpha = (x, y) => c.getContext('2d').getImageData("
        "    Math.round(x * sx), Math.round(y * sy), 1, 1).data[3];"
        "  done([figure.dataset.boxes, alpha(x1, (y1 + y2) / 2),"
        "        alpha((x1 + x2) / 2, (y1 + y2) / 2)]);"
        "});",
        text,
        uri,
        grounding,
    )
    assert boxes == "2"
    assert on_edge > 0 and inside == 0
    shown = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .tag")
    assert [s.text for s in shown[-4:]][::2] == ["red square", "blue disc"]
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "grounding_boxes.png"))


def server_data_uri(path: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


# ---- the embedded default model, demo media --------------------------------------------------

SENT = (  # records the bodies the page posts for answers
    "window.sent = []; const post = window.fetch;"
    "window.fetch = (url, init) => {"
    "  if (String(url).endsWith('/chat/completions')) sent.push(JSON.parse(init.body));"
    "  return post(url, init); };"
)


@pytest.fixture(scope="module")
def default_server(start_server):
    from qwen2vl.default_model import DEFAULT_MODEL_DIR

    with start_server(DEFAULT_MODEL_DIR) as s:
        yield s


def demo_scene(task: str, path: Path) -> Path:
    """The scene `qwen2vl demo` draws for `task` (its seed); a video as its animated GIF."""
    from qwen2vl.synth.dataset import make_sample
    from qwen2vl.synth.demo import DEMO_SEED
    from qwen2vl.synth.tasks import VIDEO_FPS

    sample = make_sample(task, seed=DEMO_SEED, index=0)
    if sample.video is None:
        sample.images[0].save(path)
    else:
        first, *rest = sample.video
        first.save(path, save_all=True, append_images=rest, duration=int(1000 / VIDEO_FPS), loop=0)
    return path


def open_page(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "model").text == server.app.state.config.model_name)
    browser.execute_script(SENT)
    return wait


def attach_and_ask(browser, wait, path: Path, question: str):
    """Attach `path`, ask `question`, and wait for the answer; returns its element."""
    from selenium.webdriver.common.by import By

    before = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    browser.find_element(By.ID, "file").send_keys(str(path))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments .chip"))
    browser.find_element(By.ID, "prompt").send_keys(question)
    browser.find_element(By.ID, "send").click()
    done = ".msg.assistant[data-state=done], .msg.assistant[data-state=error]"
    answers = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, done)[before:])
    assert answers[0].get_attribute("data-state") == "done", answers[0].text
    return answers[0]


def sent_parts(browser) -> list[str]:
    return browser.execute_script(
        "return sent.at(-1).messages.at(-1).content.map((part) => part.type)"
    )


def test_the_default_models_empty_chat_says_what_it_knows(default_server, browser):
    from selenium.webdriver.common.by import By

    wait = open_page(browser, default_server)
    notice = wait.until(lambda d: d.find_elements(By.ID, "notice"))[0]
    assert "synthetic world" in notice.text
    assert "qwen2vl serve --model Qwen/Qwen2-VL-2B-Instruct" in notice.text
    examples = notice.find_elements(By.CSS_SELECTOR, "button.example")
    assert [e.text for e in examples] == [
        "What shape is this?",
        "Find the blue star in the image and output its bounding box.",
    ]
    assert "qwen2vl-demo/shape_0.png" in notice.text
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "default_model_notice.png"))
    examples[0].click()  # puts the question in the box
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "What shape is this?"


def test_a_real_checkpoint_shows_no_note(server, browser):
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    assert not browser.find_elements(By.ID, "notice")


def test_an_animated_gif_is_sent_as_a_video_and_answered(default_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    wait = open_page(browser, default_server)
    gif = demo_scene("video_direction", tmp_path / "video_direction.gif")
    answer = attach_and_ask(browser, wait, gif, "Which way does the object move?")
    assert sent_parts(browser) == ["video_url", "text"]
    assert answer.text.strip() == "Down."  # sent as an image, the model says "Left."
    assert not browser.find_elements(By.ID, "notice")  # the note is for the empty chat


def test_a_one_frame_gif_is_sent_as_an_image(default_server, browser, tmp_path):
    wait = open_page(browser, default_server)
    gif = demo_scene("shape", tmp_path / "shape.gif")
    attach_and_ask(browser, wait, gif, "What shape is this?")
    assert sent_parts(browser) == ["image_url", "text"]


def test_images_and_boxes_show_large_and_open_full_size_on_click(default_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    wait = open_page(browser, default_server)
    question = "Find the blue star in the image and output its bounding box."
    answer = attach_and_ask(browser, wait, demo_scene("grounding", tmp_path / "g.png"), question)
    drawn = answer.find_element(By.CSS_SELECTOR, ".figure")
    assert drawn.get_attribute("data-boxes") == "1"
    assert drawn.size["width"] >= 200  # the scene is 62 px wide
    shown = browser.find_element(By.CSS_SELECTOR, ".msg.user .media img")
    assert shown.size["width"] >= 200
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "large_images.png"))
    drawn.click()
    big = wait.until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#lightbox .figure[data-boxes='1']")
    )
    assert big[0].is_displayed() and big[0].size["width"] > 2 * drawn.size["width"]
    assert browser.save_screenshot(str(ARTIFACTS / "full_size.png"))
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    assert not browser.find_element(By.ID, "lightbox").is_displayed()
