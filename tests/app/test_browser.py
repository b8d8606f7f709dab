"""``fewsight app`` in a real browser: headless Chromium (Debian ``chromium`` + ``chromium-driver``) driven by
Selenium draws boxes with the mouse on digit canvases, enrolls 8 and 9, proposes, reviews with the keyboard,
accepts everything above the slider and exports COCO; the exported file is checked.

A screenshot of each step goes to ``$FEWSIGHT_ARTEFACTS`` (default ``runs/artefacts/app``);
``FEWSIGHT_DOCS_SCREENSHOT=1`` also writes the review step to ``docs/app.png`` (the README's picture).
Skipped, with the reason, where no browser or driver is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

CHROMIUM = os.environ.get("CHROME_BIN") or shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("no headless browser: install Debian's chromium and chromium-driver (.ci/run does)",
                allow_module_level=True)
pytest.importorskip("selenium", reason="selenium not installed (pip install -e '.[dev]')")
pytest.importorskip("uvicorn")
pytest.importorskip("faiss")

import uvicorn  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

from fewsight.app import create_app  # noqa: E402
from fewsight.data import COCODataset, DigitsDataset, save_image  # noqa: E402
from fewsight.hub import save_model  # noqa: E402
from fewsight.models import DLDENet  # noqa: E402
from tests._helpers import one_thread  # noqa: F401  (autouse)

ROOT = Path(__file__).resolve().parents[2]
ARTEFACTS = Path(os.environ.get("FEWSIGHT_ARTEFACTS", ROOT / "runs" / "artefacts" / "app"))
CANVASES = 40
SHOTS = 5
SLIDER = 0.93  # about a third of the tiny detector's proposals score above it
TINY = {"backbone": "mobilenet_v2", "levels": (3, 4, 5), "fpn_channels": 16, "head_convs": 1, "weights": None,
        "embedding_dim": 8, "detections_per_image": 10, "score_threshold": 0.0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Digit canvases with SHOTS boxes of 8 and of 9 to draw, a tiny DLDENet, a server on a free port."""
    root = tmp_path_factory.mktemp("browser")
    images = root / "images"
    images.mkdir()
    ds = DigitsDataset("test", CANVASES, seed=1)
    support: dict[str, list[tuple[int, list[float]]]] = {"8": [], "9": []}
    for i in range(CANVASES):
        image, target = ds[i]
        save_image(image, images / f"canvas{i:03d}.png")
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            name = ds.classes[label]
            if name in support and len(support[name]) < SHOTS:
                support[name].append((i, box))
    assert all(len(v) == SHOTS for v in support.values())
    # An untrained detector without base classes: every object is a candidate for the enrolled digits (the
    # test checks the app; the detector's accuracy is the benchmarks' business).
    torch.manual_seed(0)
    checkpoint = save_model(DLDENet(0, **TINY, class_names=[]), root / "base.pt")
    app = create_app(images, checkpoint, root / "project", search_score_threshold=0.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started and time.monotonic() < end:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    yield {"url": f"http://127.0.0.1:{port}/", "labeller": app.state.labeller, "support": support, "root": root}
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _until(condition, timeout=60.0, what="the page"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _shot(driver, name: str) -> None:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTEFACTS / f"{name}.png"))


def _open(driver, image_id: int) -> None:
    driver.find_element(By.CSS_SELECTOR, f'#gallery .thumb[data-id="{image_id}"]').click()
    _until(lambda: driver.find_element(By.ID, "view").get_attribute("data-image") == str(image_id), 20, "the image")


def _drag_box(driver, box) -> None:
    """Press, drag and release the mouse on the canvas over ``box`` (image pixels)."""
    canvas = driver.find_element(By.ID, "view")
    scale = float(canvas.get_attribute("data-scale"))
    w, h = canvas.size["width"], canvas.size["height"]
    x1, y1, x2, y2 = (v * scale for v in box)
    # Selenium's offsets are from the element's centre.
    (ActionChains(driver).move_to_element_with_offset(canvas, round(x1 - w / 2), round(y1 - h / 2)).click_and_hold()
     .move_by_offset(round((x2 - x1) / 2), round((y2 - y1) / 2)).move_by_offset(round((x2 - x1) / 2), round((y2 - y1) / 2))
     .release().perform())


def _message(driver) -> str:
    return driver.find_element(By.ID, "message").text


def test_label_enroll_propose_accept_export(setup, browser):
    labeller, driver = setup["labeller"], browser
    driver.get(setup["url"])
    _until(lambda: driver.execute_script("return window.fewsightReady === true"), 30, "the page to load")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#gallery .thumb")) == CANVASES
    _shot(driver, "01-gallery")

    # Draw SHOTS boxes of each new digit with the mouse.
    drawn = 0
    for name, items in setup["support"].items():
        field = driver.find_element(By.ID, "class-name")
        field.clear()
        field.send_keys(name)
        for image_id, box in items:
            _open(driver, image_id)
            _drag_box(driver, box)
            drawn += 1
            _until(lambda: sum(labeller.annotations.counts().values()) == drawn, 20, "the box to be saved")
            got = labeller.annotations.boxes(labeller.folder.images[image_id].name)[-1]
            assert got["label"] == name and max(abs(a - b) for a, b in zip(got["box"], box)) <= 1.0, (got, box)
    _shot(driver, "02-drawn")

    driver.find_element(By.ID, "enroll").click()
    _until(lambda: "enrolled" in _message(driver), 120, "enrollment")
    assert labeller.enrolled == ["8", "9"] and "error" not in driver.find_element(By.ID, "message").get_attribute("class")
    _shot(driver, "03-enrolled")

    driver.find_element(By.ID, "propose").click()
    _until(lambda: labeller.progress()["state"] == "done", 300, "the proposals")
    _until(lambda: "done" in driver.find_element(By.ID, "progress-text").text, 20, "the progress bar")
    assert labeller.progress()["done"] == CANVASES and labeller.store.count() > 0

    # Review with the keyboard: the slider, n (next image with proposals), a (accept), r (reject).
    driver.execute_script("const s = document.getElementById('score'); s.value = arguments[0];"
                          "s.dispatchEvent(new Event('input'));", SLIDER)
    driver.find_element(By.ID, "view").click()  # focus the canvas (a click is no drag: no box)
    ActionChains(driver).send_keys("n").perform()
    _until(lambda: driver.find_elements(By.CSS_SELECTOR, "#proposal-list li.current"), 20, "a proposal to review")
    _shot(driver, "04-review")
    if os.environ.get("FEWSIGHT_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(ARTEFACTS / "04-review.png", ROOT / "docs" / "app.png")
    decided = lambda: labeller.proposals(status="accepted")["total"] + labeller.proposals(status="rejected")["total"]  # noqa: E731
    ActionChains(driver).send_keys("a").perform()
    _until(lambda: labeller.proposals(status="accepted")["total"] == 1, 20, "the 'a' key")
    pending = labeller.proposals(status="pending", min_score=SLIDER)["total"]
    if pending:
        ActionChains(driver).send_keys("n").perform()
        _until(lambda: driver.find_elements(By.CSS_SELECTOR, "#proposal-list li.current"), 20, "the next proposal")
        ActionChains(driver).send_keys("r").perform()
        _until(lambda: decided() == 2, 20, "the 'r' key")
    rejected = labeller.proposals(status="rejected")["total"]

    driver.find_element(By.ID, "accept-all").click()
    _until(lambda: "accepted" in _message(driver), 60, "accept all")
    assert labeller.proposals(status="pending", min_score=SLIDER)["total"] == 0
    accepted = labeller.proposals(status="accepted", limit=10**6)["items"]
    assert all(p["score"] >= SLIDER for p in accepted) and len(accepted) + rejected >= 1
    _shot(driver, "05-accepted")

    Select(driver.find_element(By.ID, "export-format")).select_by_value("coco")
    driver.find_element(By.ID, "export").click()
    _until(lambda: "exported" in _message(driver), 120, "the export")
    _shot(driver, "06-exported")

    path = setup["root"] / "project" / "exports" / "coco" / "annotations.json"
    assert str(path) in _message(driver)
    exported = COCODataset(path)
    assert len(exported) == CANVASES and exported.classes == ["8", "9"]
    boxes = {exported.image_path(i).name: exported.get_target(i) for i in range(len(exported))}
    assert sum(len(t["labels"]) for t in boxes.values()) == 2 * SHOTS + len(accepted)
    for name, items in setup["support"].items():
        for image_id, box in items:
            t = boxes[f"canvas{image_id:03d}.png"]
            label = exported.classes.index(name)
            assert any(int(k) == label and max(abs(a - b) for a, b in zip(b_, box)) <= 1.0
                       for b_, k in zip(t["boxes"].tolist(), t["labels"].tolist())), (name, box, t)
    scores = [d["score"] for d in json.loads((path.parent / "detections.json").read_text())]
    assert sorted(scores) == sorted([1.0] * 2 * SHOTS + [p["score"] for p in accepted])
