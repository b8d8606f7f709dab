"""``fewsight app`` in a real browser: headless Chromium (Debian ``chromium`` + ``chromium-driver``) driven by
Selenium draws boxes with the mouse on digit canvases, enrolls 8 and 9, proposes, reviews with the keyboard,
accepts everything above the slider and exports COCO; the exported file is checked.

Two modes:

* quick (``make test``): an untrained detector without base classes on 40 canvases; checks the app.
* acceptance (``make app-acceptance``; ``FEWSIGHT_APP_CHECKPOINT`` = a base DLDENet trained on digits 0-7,
  ``configs/digits_fewshot.yaml``): the few-shot protocol's data (:func:`fewsight.fewshot.digits_fewshot_datasets`).
  The folder holds the protocol's seed-0 5-shot support canvases (:func:`fewsight.fewshot.sample_support`) and
  its 200 test canvases. The mouse draws the 5 support boxes of each novel digit and the other objects of
  those canvases under their (known) class names, which enrollment ignores as the protocol's ``-1`` boxes;
  enroll, propose over the folder, the slider at the detector's score threshold (what the evaluation
  scores), accept all, export COCO. The novel-class AP50 of the exported ``detections.json`` on the test
  canvases against their ground truth must equal the ``fewsight bench fewshot`` figure of the same
  support set (``FEWSIGHT_APP_BENCH``: its ``results.json``; else :func:`~fewsight.fewshot.run_fewshot`
  here) within 0.01. The figures, and the library's own figure on the app's PNG files with and without
  the other objects boxed, go to ``$FEWSIGHT_ARTEFACTS/acceptance.json``.

A screenshot of each step goes to ``$FEWSIGHT_ARTEFACTS`` (default ``runs/artefacts/app``);
``FEWSIGHT_DOCS_SCREENSHOT=1`` also writes the review step to ``docs/app.png`` (the README's picture: take
it in acceptance mode, where the proposals are a trained detector's).
Skipped, with the reason, where no browser or driver is installed.
"""

from __future__ import annotations

import copy
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
CHECKPOINT = os.environ.get("FEWSIGHT_APP_CHECKPOINT")  # set: acceptance mode (module docstring)
if not (CHROMIUM and DRIVER):
    if CHECKPOINT:  # the acceptance run is asked for explicitly: no browser is a failure, not a skip
        pytest.fail("FEWSIGHT_APP_CHECKPOINT is set but there is no headless browser: install Debian's chromium and "
                    "chromium-driver", pytrace=False)
    pytest.skip("no headless browser: install Debian's chromium and chromium-driver (.ci/run does)",
                allow_module_level=True)
if not CHECKPOINT:  # acceptance mode imports them below: a missing one is an error there
    pytest.importorskip("selenium", reason="selenium not installed (pip install -e '.[dev]')")
    pytest.importorskip("uvicorn")
    pytest.importorskip("faiss")

import faiss  # noqa: E402, F401  (the search gallery)
import uvicorn  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

from fewsight.app import create_app  # noqa: E402
from fewsight.app.propose import PROPOSAL_FLOOR  # noqa: E402
from fewsight.data import COCODataset, DigitsDataset, load_image, save_image  # noqa: E402
from fewsight.hub import load_model, save_model  # noqa: E402
from fewsight.models import DLDENet  # noqa: E402
from tests._helpers import one_thread  # noqa: F401  (autouse)

ROOT = Path(__file__).resolve().parents[2]
ARTEFACTS = Path(os.environ.get("FEWSIGHT_ARTEFACTS", ROOT / "runs" / "artefacts" / "app"))
BENCH = os.environ.get("FEWSIGHT_APP_BENCH")
FULL = bool(CHECKPOINT)
PAGE = 48  # thumbnails per gallery page (static/app.js)
CANVASES = 40  # quick mode
TEST_CANVASES = 200  # acceptance mode: the protocol's test set
SHOTS, SEED = 5, 0
SLIDER = 0.93  # quick mode: about a third of the tiny detector's proposals score above it
REVIEW_SLIDER = 0.7  # acceptance mode: the slider while reviewing (and in the screenshot)
AP50_TOLERANCE = 0.01
TINY = {"backbone": "mobilenet_v2", "levels": (3, 4, 5), "fpn_channels": 16, "head_convs": 1, "weights": None,
        "embedding_dim": 8, "detections_per_image": 10, "score_threshold": 0.0}


def _quick_case(images: Path, root: Path) -> dict:
    """40 test canvases, the first SHOTS 8s and 9s to draw, an untrained detector without base classes."""
    ds = DigitsDataset("test", CANVASES, seed=1)
    draw: dict[str, list[tuple[int, list[float]]]] = {"8": [], "9": []}
    for i in range(CANVASES):
        image, target = ds[i]
        save_image(image, images / f"canvas{i:03d}.png")
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            name = ds.classes[label]
            if name in draw and len(draw[name]) < SHOTS:
                draw[name].append((i, box))
    assert all(len(v) == SHOTS for v in draw.values())
    # Every object is a candidate for the enrolled digits (the test checks the app; the detector's accuracy
    # is the acceptance mode's business).
    torch.manual_seed(0)
    checkpoint = save_model(DLDENet(0, **TINY, class_names=[]), root / "base.pt")
    return {"checkpoint": checkpoint, "draw": draw, "novel": ["8", "9"], "images": CANVASES}


def _full_case(images: Path) -> dict:
    """The protocol's seed-0 support canvases (``support<index>.png``, first in name order) and test canvases
    (``test<index>.png``); every object of the support canvases to draw, the novel ones under their class."""
    from fewsight.fewshot import digits_fewshot_datasets, sample_support

    support_ds, test_ds = digits_fewshot_datasets(TEST_CANVASES)
    base = load_model(CHECKPOINT, expect=DLDENet)
    novel = [c for c, n in enumerate(test_ds.classes) if n not in base.classes]
    support = sample_support(support_ds, novel, SHOTS, SEED)
    order = sorted(range(len(support.indices)), key=lambda j: support.indices[j])
    draw: dict[str, list[tuple[int, list[float]]]] = {test_ds.classes[c]: [] for c in novel}
    for image_id, j in enumerate(order):
        index = support.indices[j]
        save_image(support_ds[index][0], images / f"support{index:03d}.png")
        truth = support_ds.get_target(index)["labels"].tolist()
        for box, label, taken in zip(support.targets[j]["boxes"].tolist(), truth, support.targets[j]["labels"].tolist()):
            name = support_ds.classes[label]
            # An unused instance of a novel class (label -1) could only be drawn as that class, i.e. enrolled.
            assert taken >= 0 or label not in novel, f"support{index:03d}: an unused {name} the app cannot ignore"
            draw.setdefault(name, []).append((image_id, box))
    assert len(order) <= PAGE  # drawn on the gallery's first page
    for i in range(len(test_ds)):
        save_image(test_ds[i][0], images / f"test{i:03d}.png")
    return {"checkpoint": Path(CHECKPOINT), "draw": draw, "novel": [test_ds.classes[c] for c in novel],
            "images": len(order) + len(test_ds), "base": base, "support_ds": support_ds, "test_ds": test_ds,
            "support": support, "order": order, "novel_classes": novel}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The canvases and boxes to draw (quick or acceptance case) and a server on a free port."""
    root = tmp_path_factory.mktemp("browser")
    images = root / "images"
    images.mkdir()
    case = _full_case(images) if FULL else _quick_case(images, root)
    app = create_app(images, case["checkpoint"], root / "project", search_score_threshold=0.0)
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
    yield {"url": f"http://127.0.0.1:{port}/", "labeller": app.state.labeller, "root": root, "folder": images,
           **case}
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
    """Click the image's thumbnail, paging the gallery to it first."""
    first = lambda: driver.execute_script(  # noqa: E731  (the gallery is re-rendered: no element handles kept)
        "const t = document.querySelector('#gallery .thumb'); return t ? Number(t.dataset.id) : -1;")
    while (shown := first()) != image_id // PAGE * PAGE:
        driver.find_element(By.ID, "page-next" if shown < image_id else "page-prev").click()
        _until(lambda: first() != shown, 20, "the gallery page")
    driver.find_element(By.CSS_SELECTOR, f'#gallery .thumb[data-id="{image_id}"]').click()
    _until(lambda: driver.find_element(By.ID, "view").get_attribute("data-image") == str(image_id), 20, "the image")


def _drag_box(driver, box) -> None:
    """Press, drag and release the mouse on the canvas over ``box`` (image pixels), at viewport pixels rounded
    from the canvas's position (off by at most half a screen pixel: a tenth of an image pixel here)."""
    canvas = driver.find_element(By.ID, "view")
    scale = float(canvas.get_attribute("data-scale"))
    left, top = driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.left, r.top];", canvas)
    x1, y1, x2, y2 = (round(o + v * scale) for o, v in zip((left, top, left, top), box))
    actions = ActionBuilder(driver)
    (actions.pointer_action.move_to_location(x1, y1).pointer_down().move_to_location((x1 + x2) // 2, (y1 + y2) // 2)
     .move_to_location(x2, y2).pointer_up())
    actions.perform()


def _message(driver) -> str:
    return driver.find_element(By.ID, "message").text


def _set_slider(driver, value: float) -> None:
    driver.execute_script("const s = document.getElementById('score'); s.value = arguments[0];"
                          "s.dispatchEvent(new Event('input'));", value)
    _until(lambda: abs(float(driver.find_element(By.ID, "score").get_attribute("value")) - value) < 1e-9, 5,
           "the slider")


def test_label_enroll_propose_accept_export(setup, browser):
    labeller, driver = setup["labeller"], browser
    driver.get(setup["url"])
    _until(lambda: driver.execute_script("return window.fewsightReady === true"), 30, "the page to load")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#gallery .thumb")) == min(PAGE, setup["images"])
    _shot(driver, "01-gallery")

    # Draw the boxes with the mouse, a class at a time (the novel digits first).
    drawn, worst = 0, 0.0
    for name, items in setup["draw"].items():
        field = driver.find_element(By.ID, "class-name")
        field.clear()
        field.send_keys(name)
        for image_id, box in items:
            _open(driver, image_id)
            _drag_box(driver, box)
            drawn += 1
            _until(lambda: sum(labeller.annotations.counts().values()) == drawn, 20, "the box to be saved")
            got = labeller.annotations.boxes(labeller.folder.images[image_id].name)[-1]
            error = max(abs(a - b) for a, b in zip(got["box"], box))
            assert got["label"] == name and error <= 1.0, (got, box)
            worst = max(worst, error)
    _shot(driver, "02-drawn")

    driver.find_element(By.ID, "enroll").click()
    _until(lambda: "enrolled" in _message(driver), 300, "enrollment")
    assert labeller.enrolled == setup["novel"] and "error" not in driver.find_element(By.ID, "message").get_attribute("class")
    _shot(driver, "03-enrolled")

    driver.find_element(By.ID, "propose").click()
    _until(lambda: labeller.progress()["state"] == "done", 1800 if FULL else 300, "the proposals")
    _until(lambda: "done" in driver.find_element(By.ID, "progress-text").text, 20, "the progress bar")
    assert labeller.progress()["done"] == setup["images"] and labeller.store.count() > 0

    # Review with the keyboard: the slider, n (next image with proposals), a (accept), r (reject).
    _set_slider(driver, REVIEW_SLIDER if FULL else SLIDER)
    if FULL:  # start just before the test canvas to show (the screenshot), n opens it
        _open(driver, _showcase(setup) - 1)
        driver.execute_script("window.scrollTo(0, 0)")
    driver.find_element(By.ID, "view").click()  # focus the canvas (a click is no drag: no box)
    ActionChains(driver).send_keys("n").perform()
    _until(lambda: driver.find_elements(By.CSS_SELECTOR, "#proposal-list li.current"), 20, "a proposal to review")
    _shot(driver, "04-review")
    if os.environ.get("FEWSIGHT_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(ARTEFACTS / "04-review.png", ROOT / "docs" / "app.png")
    decided = lambda: labeller.proposals(status="accepted")["total"] + labeller.proposals(status="rejected")["total"]  # noqa: E731
    ActionChains(driver).send_keys("a").perform()
    _until(lambda: labeller.proposals(status="accepted")["total"] == 1, 20, "the 'a' key")
    # Acceptance mode keeps every proposal the evaluation scores: nothing is rejected there.
    if not FULL and labeller.proposals(status="pending", min_score=SLIDER)["total"]:
        ActionChains(driver).send_keys("n").perform()
        _until(lambda: driver.find_elements(By.CSS_SELECTOR, "#proposal-list li.current"), 20, "the next proposal")
        ActionChains(driver).send_keys("r").perform()
        _until(lambda: decided() == 2, 20, "the 'r' key")
    rejected = labeller.proposals(status="rejected")["total"]

    # Accept all above the slider; in acceptance mode the slider sits at the detector's score threshold, so
    # what is accepted is every detection the protocol's evaluation scores.
    threshold = SLIDER
    if FULL:
        threshold = float(labeller.model.postprocessor.score_threshold)
        assert threshold >= PROPOSAL_FLOOR, "the app keeps no proposal below PROPOSAL_FLOOR: the evaluation would score more"
        _set_slider(driver, threshold)
    driver.find_element(By.ID, "accept-all").click()
    _until(lambda: "accepted" in _message(driver), 120, "accept all")
    assert labeller.proposals(status="pending", min_score=threshold)["total"] == 0
    accepted = labeller.proposals(status="accepted", limit=10**7)["items"]
    assert all(p["score"] >= threshold for p in accepted) and len(accepted) + rejected >= 1
    if FULL:
        assert len(accepted) == labeller.store.count()
    _shot(driver, "05-accepted")

    Select(driver.find_element(By.ID, "export-format")).select_by_value("coco")
    driver.find_element(By.ID, "export").click()
    _until(lambda: "exported" in _message(driver), 300, "the export")
    _shot(driver, "06-exported")

    path = setup["root"] / "project" / "exports" / "coco" / "annotations.json"
    assert str(path) in _message(driver)
    exported = COCODataset(path)
    assert len(exported) == setup["images"] and exported.classes == labeller.annotations.classes
    assert exported.classes[: len(setup["novel"])] == setup["novel"]
    boxes = {exported.image_path(i).name: exported.get_target(i) for i in range(len(exported))}
    assert sum(len(t["labels"]) for t in boxes.values()) == drawn + len(accepted)
    for name, items in setup["draw"].items():
        for image_id, box in items:
            t = boxes[labeller.folder.images[image_id].name]
            label = exported.classes.index(name)
            assert any(int(k) == label and max(abs(a - b) for a, b in zip(b_, box)) <= 1.0
                       for b_, k in zip(t["boxes"].tolist(), t["labels"].tolist())), (name, box, t)
    scores = [d["score"] for d in json.loads((path.parent / "detections.json").read_text())]
    assert sorted(scores) == sorted([1.0] * drawn + [p["score"] for p in accepted])
    if FULL:
        _acceptance(setup, path.parent, worst)


def _showcase(setup) -> int:
    """The test canvas to show: proposals above REVIEW_SLIDER of every novel class, fewest of them wrong (not
    overlapping an object of their class at IoU >= 0.5), then most right; the first test canvas if none."""
    from fewsight.geometry import box_iou

    labeller, test_ds = setup["labeller"], setup["test_ds"]
    ranked = []
    for i in range(len(setup["order"]), setup["images"]):
        name = labeller.folder.images[i].name
        shown = [p for p in labeller.store.items(name) if p["score"] >= REVIEW_SLIDER]
        if not set(setup["novel"]) <= {p["label"] for p in shown}:
            continue
        t = test_ds.get_target(int(name[4:-4]))
        iou = box_iou(torch.tensor([p["box"] for p in shown]), t["boxes"])
        truth = [test_ds.classes[k] for k in t["labels"].tolist()]
        right = sum(any(iou[a, b] >= 0.5 and truth[b] == p["label"] for b in range(len(truth)))
                    for a, p in enumerate(shown))
        ranked.append((len(shown) - right, -right, i))
    return min(ranked)[2] if ranked else len(setup["order"])


# -- acceptance mode: the exported file's novel AP50 against the protocol's ---------------------------
class _Images:
    """``(image, target)`` items from lists (the PNG files' pixels with the test set's targets)."""

    def __init__(self, images, targets, classes):
        self.images, self.targets, self.classes = images, targets, classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def _novel_ap50(metrics, names) -> float:
    return round(sum(metrics["per_class"][n]["ap50"] for n in names) / len(names), 4)


def _exported_ap50(export: Path, test_ds, order, novel) -> tuple[float, dict]:
    """Novel AP50 of the exported ``detections.json`` on the test canvases (the support canvases are no test
    images, as in the protocol) against the test set's ground truth, scored as the protocol scores."""
    from fewsight.eval import evaluate_detections

    coco = json.loads((export / "annotations.json").read_text())
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    found: list[list[tuple[list[float], float, int]]] = [[] for _ in range(len(test_ds))]
    for d in json.loads((export / "detections.json").read_text()):
        name = Path(files[d["image_id"]]).name  # the export's file names are under images/
        if name.startswith("test"):
            x, y, w, h = d["bbox"]
            found[int(name[4:-4])].append(([x, y, x + w, y + h], d["score"], order.index(names[d["category_id"]])))
    predictions = [{"boxes": torch.tensor([b for b, _, _ in f], dtype=torch.float32).reshape(-1, 4),
                    "scores": torch.tensor([s for _, s, _ in f], dtype=torch.float32),
                    "labels": torch.tensor([k for _, _, k in f], dtype=torch.long)} for f in found]
    targets = []
    for i in range(len(test_ds)):
        t = test_ds.get_target(i)
        targets.append({"boxes": t["boxes"], "labels": torch.tensor([order.index(test_ds.classes[k]) for k in
                                                                     t["labels"].tolist()], dtype=torch.long)})
    metrics = evaluate_detections(predictions, targets, class_names=order)
    per_class = {n: round(metrics["per_class"][n]["ap50"], 4) for n in novel}
    return _novel_ap50(metrics, novel), {"per_class_ap50": per_class,
                                         "detections": sum(len(f) for f in found)}


def _bench_figure(setup, order) -> tuple[float, dict, str]:
    """The ``fewsight bench fewshot`` novel AP50 of k=SHOTS, seed SEED: its results.json, else run here."""
    from fewsight.fewshot import run_fewshot

    if BENCH:
        data = json.loads(Path(BENCH).read_text())
        assert data["data"] == "digits" and Path(data["checkpoint"]).resolve() == Path(CHECKPOINT).resolve(), \
            f"{BENCH}: expected `fewsight bench fewshot` on digits with {CHECKPOINT}"
        (run,) = [r for r in data["runs"] if r["mode"] == "enroll" and r["k"] == SHOTS and r["seed"] == SEED]
        return run["novel_ap50"], run["per_class_ap50"], f"fewsight bench fewshot ({BENCH})"
    result = run_fewshot(setup["base"], support_dataset=setup["support_ds"], test_dataset=setup["test_ds"],
                         novel_classes=setup["novel_classes"], shots=[SHOTS], seeds=[SEED], batch_size=16,
                         progress=False)
    (run,) = result.runs
    return run["novel_ap50"], run["per_class_ap50"], "fewsight.fewshot.run_fewshot (as fewsight bench fewshot)"


def _png_test_set(setup, order) -> _Images:
    test_ds, folder = setup["test_ds"], setup["folder"]
    targets = []
    for i in range(len(test_ds)):
        t = test_ds.get_target(i)
        targets.append({"boxes": t["boxes"], "labels": torch.tensor([order.index(test_ds.classes[k])
                                                                     for k in t["labels"].tolist()])})
    return _Images([load_image(folder / f"test{i:03d}.png") for i in range(len(test_ds))], targets, order)


def _library_on_png(setup, test, novel, support) -> tuple[float, torch.nn.Module]:
    """The protocol's enrollment (:func:`~fewsight.fewshot.enroll_support`, default settings) from ``support``
    on the app's PNG files (8-bit pixels) and its evaluation on the PNG test canvases."""
    from fewsight.eval import evaluate_model
    from fewsight.fewshot import enroll_support

    images = [load_image(setup["folder"] / f"support{i:03d}.png") for i in support.indices]
    model = copy.deepcopy(setup["base"])
    enroll_support(model, images, support, novel)
    return _novel_ap50(evaluate_model(model, test, 16, class_names=test.classes, progress=False), novel), model


def _max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sb = b.state_dict()
    return max(float((v.float() - sb[k].float()).abs().max()) if v.numel() else 0.0
               for k, v in a.state_dict().items() if isinstance(v, torch.Tensor))


def _acceptance(setup, export: Path, worst: float) -> None:
    """The export's novel AP50 against the bench figure, and the steps between them (all on the same
    model, support set and test canvases): the library on the PNG files (8-bit pixels) with the protocol's
    boxes, with the boxes the mouse drew (the enrolled model compared with the app's), and with the support
    canvases' other objects left unboxed (background, not ignored)."""
    from fewsight.fewshot import SupportSet

    novel, labeller, support = setup["novel"], setup["labeller"], setup["support"]
    order = list(setup["base"].classes) + novel  # the protocol's label order after enrollment
    app, app_detail = _exported_ap50(export, setup["test_ds"], order, novel)
    bench, bench_per_class, source = _bench_figure(setup, order)
    test = _png_test_set(setup, order)
    png, _ = _library_on_png(setup, test, novel, support)
    only = [{"boxes": t["boxes"][t["labels"] >= 0], "labels": t["labels"][t["labels"] >= 0]} for t in support.targets]
    png_background, _ = _library_on_png(setup, test, novel, SupportSet(support.indices, only, support.classes, SHOTS))
    # The boxes as drawn, in the app's image order (support canvases by name): what the app enrolled.
    indices, targets = sorted(support.indices), []
    for i in indices:
        boxes = [b for b in labeller.annotations.boxes(f"support{i:03d}.png") if b["source"] == "drawn"]  # not accepted
        targets.append({"boxes": torch.tensor([b["box"] for b in boxes]),
                        "labels": torch.tensor([novel.index(b["label"]) if b["label"] in novel else -1 for b in boxes])})
    png_drawn, drawn_model = _library_on_png(setup, test, novel, SupportSet(indices, targets, support.classes, SHOTS))
    report = {
        "checkpoint": str(CHECKPOINT), "shots": SHOTS, "seed": SEED, "novel": novel,
        "support_images": [f"support{i:03d}.png" for i in indices],
        "drawn_boxes": sum(len(v) for v in setup["draw"].values()), "largest_drawing_error_px": round(worst, 3),
        "test_images": len(setup["test_ds"]), "score_threshold": float(labeller.model.postprocessor.score_threshold),
        "app_novel_ap50": app, "app_per_class_ap50": app_detail["per_class_ap50"],
        "app_test_detections": app_detail["detections"],
        "bench_novel_ap50": bench, "bench_per_class_ap50": {n: bench_per_class[n] for n in novel}, "bench_source": source,
        "difference": round(app - bench, 4), "tolerance": AP50_TOLERANCE,
        "steps": {
            "library, dataset pixels, protocol boxes (the bench figure)": bench,
            "library, PNG pixels, protocol boxes": png,
            "library, PNG pixels, boxes drawn with the mouse": png_drawn,
            "app export (PNG pixels, drawn boxes, the app's proposal run)": app,
            "library, PNG pixels, protocol boxes, other objects unboxed (background)": png_background,
        },
        "app_model_vs_library_drawn_boxes_max_abs_difference": _max_difference(labeller.model, drawn_model),
    }
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    (ARTEFACTS / "acceptance.json").write_text(json.dumps(report, indent=1))
    print(f"\nnovel AP50 ({'/'.join(novel)}, {SHOTS}-shot, seed {SEED}, {len(setup['test_ds'])} test canvases): "
          f"app export {app:.4f}  bench {bench:.4f}  difference {app - bench:+.4f} (tolerance {AP50_TOLERANCE})")
    for step, value in report["steps"].items():
        print(f"  {value:.4f}  {step}")
    print(f"report: {ARTEFACTS / 'acceptance.json'}")
    assert abs(app - bench) <= AP50_TOLERANCE, report
    # The app's enrollment is the library's on the same boxes (its support set and enroll_support).
    assert report["app_model_vs_library_drawn_boxes_max_abs_difference"] <= 1e-5, report
