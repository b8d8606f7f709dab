"""The ``fewsight app`` HTTP API through FastAPI's test client: every endpoint, bad input, path traversal,
concurrent writes, a wrong checkpoint, corrupt images, and a proposal run resumed after a stop or a kill."""

from __future__ import annotations

import json
import shutil
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("faiss")

with warnings.catch_warnings():  # newer Starlette prefers the httpx2 fork; httpx works with every version
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from fewsight.app import create_app  # noqa: E402
from fewsight.app.propose import STATE_FILE  # noqa: E402
from fewsight.cli import main  # noqa: E402
from fewsight.data import COCODataset, DigitsDataset, open_dataset, save_image  # noqa: E402
from fewsight.errors import CheckpointError, DataError, InvalidArgumentError  # noqa: E402
from fewsight.hub import save_model  # noqa: E402
from fewsight.models import DLDENet, RetinaNet  # noqa: E402
from tests._helpers import one_thread  # noqa: F401  (autouse)

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

TINY = {"backbone": "mobilenet_v2", "levels": (3, 4, 5), "fpn_channels": 16, "head_convs": 1, "weights": None,
        "anchor_generator": {"levels": [3, 4, 5], "sizes": [16, 32, 64], "scales": [1.0], "aspect_ratios": [1.0, 2.0]},
        "detections_per_image": 10, "score_threshold": 0.0}
N_IMAGES = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An image folder of 64-px digit canvases (plus a truncated PNG, a non-image, an empty PNG), a tiny DLDENet
    file, a RetinaNet file, and the canvases' true boxes."""
    root = tmp_path_factory.mktemp("app")
    images = root / "images"
    images.mkdir()
    ds = DigitsDataset("val", N_IMAGES, image_size=64, digit_size=(16, 32), max_digits=2, seed=3)
    truth = []
    for i in range(len(ds)):
        image, target = ds[i]
        save_image(image, images / f"c{i:02d}.png")
        truth.append(target["boxes"].tolist())
    whole = (images / "c00.png").read_bytes()
    (images / "zz_truncated.png").write_bytes(whole[: len(whole) // 2])  # a valid header, then nothing
    (images / "notes.txt").write_text("not an image")
    (images / "zz_empty.png").write_bytes(b"")
    torch.manual_seed(0)
    det = save_model(DLDENet(2, **TINY, embedding_dim=8, class_names=["0", "1"]), root / "dldenet.pt")
    kw = {k: v for k, v in TINY.items()}
    retina = save_model(RetinaNet(2, **kw, class_names=["0", "1"]), root / "retinanet.pt")
    return {"root": root, "images": images, "checkpoint": det, "retinanet": retina, "truth": truth}


def _client(data, project, **options) -> TestClient:
    options.setdefault("search_score_threshold", 0.0)
    return TestClient(create_app(data["images"], data["checkpoint"], project, **options))


@pytest.fixture()
def client(data, tmp_path):
    with _client(data, tmp_path / "project") as c:
        yield c


def _draw(client, image_id, boxes) -> dict:
    r = client.put(f"/api/images/{image_id}/annotations", json={"boxes": boxes})
    assert r.status_code == 200, r.text
    return r.json()


def _wait(client, timeout=60.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        p = client.get("/api/propose").json()
        if p["state"] != "running":
            return p
        time.sleep(0.05)
    raise AssertionError("the proposal run did not finish")


def _enrolled(client, data) -> None:
    """Draw the first box of images 0-2 as class "8" and enroll it."""
    for i in range(3):
        _draw(client, i, [{"box": data["truth"][i][0], "label": "8"}])
    r = client.post("/api/enroll")
    assert r.status_code == 200, r.text


# -- the page ---------------------------------------------------------------------------------------
def test_page_and_static_files(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in r.text and "//cdn" not in r.text and "https://" not in r.text
    for name, kind in (("app.js", "javascript"), ("app.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.content) > 100


@pytest.mark.parametrize("path", ["/static/../../pyproject.toml", "/static/..%2F..%2Fpyproject.toml",
                                  "/static/%2Fetc%2Fpasswd", "/static/nope.js", "/static/__init__.py",
                                  "/static/..%5C..%5Cpyproject.toml"])
def test_static_traversal_refused(client, path):
    r = client.get(path)
    assert r.status_code == 404 and "error" in r.json()


# -- images -----------------------------------------------------------------------------------------
def test_image_list_paging_and_skipped(client, data):
    r = client.get("/api/images", params={"offset": 0, "limit": 3}).json()
    assert r["total"] == N_IMAGES + 1  # the truncated PNG has a readable header: listed until decoded
    assert [im["name"] for im in r["images"]] == ["c00.png", "c01.png", "c02.png"]
    assert r["images"][0]["width"] == 64 and r["images"][0]["boxes"] == 0
    assert [im["id"] for im in client.get("/api/images", params={"offset": 7, "limit": 3}).json()["images"]] == [7, 8]
    assert client.get("/api/images", params={"offset": 100}).json()["images"] == []
    skipped = {s["name"]: s["reason"] for s in client.get("/api/skipped").json()["skipped"]}
    assert set(skipped) == {"notes.txt", "zz_empty.png"}
    assert "unsupported file type" in skipped["notes.txt"]
    for bad in ({"limit": 0}, {"limit": 5000}, {"offset": -1}, {"limit": "x"}):
        r = client.get("/api/images", params=bad)
        assert r.status_code == 422 and r.json()["error"]


def test_image_bytes_and_thumbnail(client, data):
    r = client.get("/api/images/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == (data["images"] / "c00.png").read_bytes()
    r = client.get("/api/images/1/thumb")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"


def test_corrupt_image_is_listed_and_skipped(client):
    truncated = N_IMAGES  # last in name order
    r = client.get(f"/api/images/{truncated}/thumb")
    assert r.status_code == 400 and "zz_truncated.png" in r.json()["error"]
    names = [s["name"] for s in client.get("/api/skipped").json()["skipped"]]
    assert "zz_truncated.png" in names
    assert client.get("/api/images", params={"offset": truncated}).json()["images"][0]["skipped"] is True


@pytest.mark.parametrize("image_id", ["99", "-1", "1e0", "01", "%201", "abc", "..%2F..%2Fetc%2Fpasswd",
                                      "%2Fetc%2Fpasswd", "..", "%2e%2e", "0%00", "c00.png", "%C2%B2", "%D9%A1",
                                      "9" * 5000])
def test_image_traversal_and_unknown_ids_refused(client, image_id):
    for suffix in ("", "/thumb", "/annotations"):
        r = client.get(f"/api/images/{image_id}{suffix}")
        assert r.status_code == 404, (image_id, suffix, r.status_code)
        assert "error" in r.json() and b"root:" not in r.content
    r = client.put(f"/api/images/{image_id}/annotations", json={"boxes": []})
    assert r.status_code in (404, 405) and "error" in r.json()


def test_absolute_and_dotted_paths_never_reach_files(client):
    for path in ("/api/images/../../../../etc/passwd", "//etc/passwd", "/api/images/%2e%2e/%2e%2e/etc/passwd",
                 "/api/../pyproject.toml"):
        r = client.get(path)
        assert r.status_code == 404 and b"root:" not in r.content and b"[project]" not in r.content


# -- annotations ------------------------------------------------------------------------------------
def test_annotations_round_trip_and_coco_file(client, data, tmp_path):
    out = _draw(client, 2, [{"box": [10, 12, 30, 40], "label": " cat "},
                            {"box": [-5, 50, 70, 80], "label": "dog"}])  # clipped to the 64 x 64 image
    assert [b["box"] for b in out["boxes"]] == [[10, 12, 30, 40], [0, 50, 64, 64]]
    assert [b["label"] for b in out["boxes"]] == ["cat", "dog"] and out["classes"] == ["cat", "dog"]
    got = client.get("/api/images/2/annotations").json()
    assert got["boxes"] == out["boxes"] and got["proposals"] == []
    ds = COCODataset(tmp_path / "project" / "annotations.json", data["images"])
    assert ds.classes == ["cat", "dog"] and ds.image_path(0).name == "c02.png"
    assert ds.get_target(0)["boxes"].tolist() == [[10, 12, 30, 40], [0, 50, 64, 64]]
    assert _draw(client, 2, [])["boxes"] == []  # deleting every box
    status = client.get("/api/status").json()
    assert status["boxes"] == 0 and status["classes"] == ["cat", "dog"]


@pytest.mark.parametrize("body,status,words", [
    ({"boxes": [{"box": [1, 2, 3], "label": "a"}]}, 422, "boxes.0.box"),
    ({"boxes": [{"box": [1, 2, 3, 4, 5], "label": "a"}]}, 422, "boxes.0.box"),
    ({"boxes": [{"box": ["a", 2, 3, 4], "label": "a"}]}, 422, "boxes.0.box.0"),
    ({"boxes": [{"box": [1, 2, 3, 4]}]}, 422, "boxes.0.label"),
    ({"boxes": [{"box": [1, 2, 3, 4], "label": 7}]}, 422, "boxes.0.label"),
    ({"boxes": [{"box": [1, 2, 3, 4], "label": "  "}]}, 400, "boxes[0].label"),
    ({"boxes": [{"box": [1, 2, 3, 4], "label": "a\nb"}]}, 400, "boxes[0].label"),
    ({"boxes": [{"box": [1, 2, 3, 4], "label": "x" * 101}]}, 400, "boxes[0].label"),
    ({"boxes": [{"box": [30, 2, 10, 4], "label": "a"}]}, 400, "x1 < x2"),
    ({"boxes": [{"box": [100, 100, 120, 120], "label": "a"}]}, 400, "inside the 64x64 image"),
    ({"boxes": [{"box": [1, 2, 3, 4], "label": "a", "source": "magic"}]}, 422, "boxes.0.source"),
    ({"boxes": [{"box": [1, 2, 3, 4], "label": "a", "score": 2}]}, 422, "boxes.0.score"),
    ({"boxes": {"box": [1, 2, 3, 4]}}, 422, "boxes"),
    ({}, 422, "boxes"),
])
def test_malformed_boxes_refused_and_nothing_written(client, body, status, words):
    _draw(client, 0, [{"box": [1, 1, 9, 9], "label": "keep"}])
    r = client.put("/api/images/0/annotations", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert [b["label"] for b in client.get("/api/images/0/annotations").json()["boxes"]] == ["keep"]


@pytest.mark.parametrize("raw", [b'{"boxes": [{"box": [NaN, 1, 5, 5], "label": "a"}]}',
                                 b'{"boxes": [{"box": [1, 1, Infinity, 5], "label": "a"}]}',
                                 b'{"boxes": [{"box": [1, 1, 1e999, 5], "label": "a"}]}',
                                 b'{"boxes": [{"box": [1, 1, -Infinity, 5], "label": "a"}]}',
                                 b'{"boxes": [', b"not json", b"\xff\xfe"])
def test_non_finite_numbers_and_broken_json_refused(client, raw):
    r = client.put("/api/images/0/annotations", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]
    assert client.get("/api/images/0/annotations").json()["boxes"] == []


def test_concurrent_writes_never_tear_the_file(client, tmp_path):
    """Threads rewriting one image while a reader parses the file: always valid JSON, last write wins."""
    path = tmp_path / "project" / "annotations.json"
    stop = threading.Event()
    failures: list[str] = []
    written: list[list[float]] = []

    def writer(k: int) -> None:
        for j in range(8):
            box = [1.0 + k, 1.0 + j, 20.0 + k, 30.0 + j]
            r = client.put("/api/images/1/annotations", json={"boxes": [{"box": box, "label": f"w{k}"}] * (1 + j % 3)})
            if r.status_code != 200:
                failures.append(r.text)
            written.append(box)

    def reader() -> None:
        while not stop.is_set():
            if path.exists():
                try:
                    data = json.loads(path.read_text())
                    assert {"images", "annotations", "categories"} <= set(data)
                except Exception as exc:  # a torn or half-written file
                    failures.append(f"reader: {exc!r}")

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    watch = threading.Thread(target=reader)
    watch.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watch.join()
    assert not failures, failures[:3]
    final = client.get("/api/images/1/annotations").json()["boxes"]
    on_disk = json.loads(path.read_text())["annotations"]
    assert len({tuple(b["box"]) for b in final}) == 1 and final[0]["box"] in written  # one whole write, not a mix
    assert [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
            for a in on_disk] == [b["box"] for b in final]
    assert not list(path.parent.glob(".annotations.json.*.tmp"))


# -- start-up refusals ------------------------------------------------------------------------------
def test_wrong_checkpoint_and_bad_folders_refused(data, tmp_path):
    with pytest.raises(CheckpointError, match="expected a DLDENet file, got a RetinaNet"):
        create_app(data["images"], data["retinanet"], tmp_path / "p")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="junk.pt"):
        create_app(data["images"], junk, tmp_path / "p")
    with pytest.raises(InvalidArgumentError, match="images"):
        create_app(tmp_path / "missing", data["checkpoint"], tmp_path / "p")
    with pytest.raises(InvalidArgumentError, match="project"):
        create_app(data["images"], data["checkpoint"], data["images"])
    with pytest.raises(CheckpointError, match="CropEmbedder"):
        create_app(data["images"], data["checkpoint"], tmp_path / "p", embedder=data["checkpoint"])


def test_corrupt_project_file_refused_not_overwritten(data, tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    (project / "annotations.json").write_text('{"images": [')
    with pytest.raises(DataError, match="annotations.json"):
        create_app(data["images"], data["checkpoint"], project)
    assert (project / "annotations.json").read_text() == '{"images": ['


def test_cli_app_refuses_with_one_line(data, tmp_path, capsys):
    assert main(["app", "--help"]) == 0
    assert "--checkpoint" in capsys.readouterr().out
    assert main(["app", "--images", str(data["images"]), "--checkpoint", str(data["retinanet"]),
                 "--project", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fewsight app: ") and "RetinaNet" in err and "\n" not in err
    assert main(["app", "--images", str(data["images"]), "--checkpoint", str(data["checkpoint"]), "--port", "0"]) == 1
    assert "--port" in capsys.readouterr().err


# -- enroll, propose, decide, search, export --------------------------------------------------------
def test_enroll_and_propose_need_their_inputs(client, data):
    r = client.post("/api/propose", json={})
    assert r.status_code == 400 and "enroll first" in r.json()["error"]
    _draw(client, 0, [{"box": data["truth"][0][0], "label": "0"}])  # a class the detector knows
    r = client.post("/api/enroll")
    assert r.status_code == 400 and "does not know" in r.json()["error"]
    assert client.post("/api/propose", json={"limit": 0}).status_code == 422
    assert client.get("/api/propose").json()["state"] == "no model"


def test_enroll_propose_accept_reject_export(client, data, tmp_path):
    _enrolled(client, data)
    status = client.get("/api/status").json()
    assert status["enrolled"] == ["8"] and (tmp_path / "project" / "model.pt").is_file()
    p = client.post("/api/propose", json={}).json()
    assert p["state"] in ("running", "done")
    p = _wait(client)
    assert p["state"] == "done" and p["done"] == p["total"] == N_IMAGES and p["first_proposal_s"] is not None
    listed = client.get("/api/proposals", params={"limit": 1000}).json()
    assert listed["total"] == p["proposals"] > 0
    assert all(it["label"] == "8" and 0.05 <= it["score"] <= 1 for it in listed["items"])
    first = listed["items"][0]
    # reject one by key, accept every pending one above a score, then undo an acceptance
    assert client.post("/api/proposals/reject", json={"keys": [first["key"]]}).json()["decided"] == 1
    threshold = sorted(it["score"] for it in listed["items"])[len(listed["items"]) // 2]
    accepted = client.post("/api/proposals/accept", json={"min_score": threshold}).json()["decided"]
    expect = sum(it["score"] >= threshold and it["key"] != first["key"] for it in listed["items"])
    assert accepted == expect
    assert client.post("/api/proposals/accept", json={"min_score": threshold}).json()["decided"] == 0  # idempotent
    pending = client.get("/api/proposals", params={"status": "pending", "min_score": threshold}).json()
    assert pending["total"] == 0
    boxes = sum(len(client.get(f"/api/images/{i}/annotations").json()["boxes"]) for i in range(N_IMAGES))
    assert boxes == 3 + accepted
    one = client.get("/api/proposals", params={"status": "accepted", "limit": 1}).json()["items"][0]
    client.post("/api/proposals/reject", json={"keys": [one["key"]]})
    assert all(b.get("proposal") != one["key"] for b in
               client.get(f"/api/images/{one['image']}/annotations").json()["boxes"])
    per_image = client.get("/api/proposals", params={"image": one["image"]}).json()
    assert per_image["images"] == [one["image"]]
    # bad decisions
    assert client.post("/api/proposals/accept", json={"keys": ["c00.png#999", "../x#0"]}).status_code == 400
    assert client.post("/api/proposals/accept", json={}).status_code == 400
    assert client.post("/api/proposals/accept", json={"min_score": "NaN"}).status_code == 422
    assert client.post("/api/proposals/maybe", json={"keys": []}).status_code == 422
    assert client.get("/api/proposals", params={"status": "odd"}).status_code == 422
    assert client.get("/api/proposals", params={"image": "../0"}).status_code == 404
    # export in every format, read back by the dataset readers
    total = boxes - 1
    for fmt in ("coco", "voc", "yolo", "csv"):
        r = client.post("/api/export", json={"format": fmt})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["images"] == N_IMAGES and out["boxes"] == total
        back = open_dataset(out["path"])
        assert len(back) == N_IMAGES and sum(len(back.get_target(i)["labels"]) for i in range(len(back))) == total
    coco = Path(client.post("/api/export", json={"format": "coco"}).json()["folder"])
    results = json.loads((coco / "detections.json").read_text())
    assert len(results) == total and all("score" in d for d in results)
    assert client.post("/api/export", json={"format": "pascal"}).status_code == 400
    assert client.post("/api/export", json={"format": "../../x"}).status_code == 400


def test_enrollment_support_set_is_the_protocols(client, data):
    """The app enrolls the library's support set of the saved boxes (fewsight.fewshot.all_boxes_support): a box
    of a known class and an accepted proposal are ignored (-1, as sample_support marks the protocol's other
    objects), not background; the model equals fewsight.fewshot.enroll_support on those targets."""
    import copy

    from fewsight.app.service import ACCEPTED, SavedBoxes
    from fewsight.data import load_image
    from fewsight.fewshot import EnrollSettings, SupportSet, enroll_support
    from fewsight.fewshot.support import all_boxes_support

    two = next(i for i, boxes in enumerate(data["truth"]) if len(boxes) == 2)
    other = next(i for i in range(N_IMAGES) if i != two)
    new, known = data["truth"][two]
    _draw(client, two, [{"box": new, "label": "8"}, {"box": known, "label": "0"}])
    _draw(client, other, [{"box": data["truth"][other][0], "label": "8", "source": "proposal", "score": 0.9,
                           "proposal": f"c{other:02d}.png#0"}])
    labeller = client.app.state.labeller
    saved = SavedBoxes(labeller.folder, labeller.annotations.snapshot())
    assert saved.classes == ["8", "0", ACCEPTED]
    support = all_boxes_support(saved, [0])
    assert [saved.infos[i].name for i in support.indices] == [f"c{two:02d}.png"]
    assert support.targets[0]["labels"].tolist() == [0, -1]
    r = client.post("/api/enroll").json()
    assert r["enrolled"] == ["8"] and r["boxes"] == {"8": 1} and r["support_images"] == 1
    expected = copy.deepcopy(labeller.base)
    target = {"boxes": torch.tensor([new, known]), "labels": torch.tensor([0, -1])}
    enroll_support(expected, [load_image(data["images"] / f"c{two:02d}.png")], SupportSet([0], [target], [0], 0),
                   ["8"], EnrollSettings())
    got = labeller.model.state_dict()
    assert all(torch.equal(v, got[k]) if isinstance(v, torch.Tensor) else v == got[k]
               for k, v in expected.state_dict().items())


def test_re_enroll_drops_old_proposals(client, data, tmp_path):
    _enrolled(client, data)
    client.post("/api/propose", json={"limit": 2})
    assert _wait(client)["done"] == 2
    _draw(client, 3, [{"box": data["truth"][3][0], "label": "9"}])
    assert client.post("/api/enroll").json()["enrolled"] == ["8", "9"]
    assert client.get("/api/propose").json()["done"] == 0
    assert not list((tmp_path / "project" / "proposals").glob("chunk-*.json"))


def test_search_by_a_drawn_box(client, data):
    box = data["truth"][0][0]
    r = client.post("/api/search", json={"image": 0, "box": box, "k": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["gallery"] > 0 and 1 <= len(out["results"]) <= 3
    assert len({h["image"] for h in out["results"]}) == len(out["results"])  # one hit per image
    assert all(0 <= h["image"] < N_IMAGES and len(h["box"]) == 4 for h in out["results"])
    assert client.post("/api/search", json={"image": 99, "box": box}).status_code == 404
    assert client.post("/api/search", json={"image": 0, "box": [1, 2, 3]}).status_code == 422
    assert client.post("/api/search", json={"image": 0, "box": box, "k": 0}).status_code == 422
    assert client.post("/api/search", json={"image": 0, "box": [70, 70, 90, 90]}).status_code == 400
    assert client.post("/api/search", content=b'{"image": 0, "box": [NaN, 1, 2, 3]}',
                       headers={"content-type": "application/json"}).status_code == 422


# -- resuming ---------------------------------------------------------------------------------------
def test_propose_resumes_after_stop_and_after_kill(data, tmp_path):
    project = tmp_path / "project"
    with _client(data, project) as c:
        _enrolled(c, data)
        c.post("/api/propose", json={"limit": 3})
        assert _wait(c)["done"] == 3
        kept = {p.name: p.read_bytes() for p in (project / "proposals").glob("chunk-*.json")}
        before = (project / "annotations.json").read_bytes()
    # A new server on the same project: annotations intact, the three images not proposed again.
    with _client(data, project) as c:
        assert c.get("/api/status").json()["enrolled"] == ["8"]
        assert c.get("/api/propose").json()["done"] == 3
        assert len(c.get("/api/images/0/annotations").json()["boxes"]) == 1
        c.post("/api/propose", json={"limit": 2})
        p = _wait(c)
        assert p["done"] == 5 and p["run_total"] == 2
    assert (project / "annotations.json").read_bytes() == before
    assert all((project / "proposals" / n).read_bytes() == b for n, b in kept.items())
    # A killed server leaves propose.json saying a run was going on: the next server resumes it by itself.
    state = json.loads((project / STATE_FILE).read_text())
    (project / STATE_FILE).write_text(json.dumps({**state, "running": True, "limit": None}))
    with _client(data, project) as c:
        p = _wait(c)
        assert p["state"] == "done" and p["done"] == p["total"] == N_IMAGES and p["run_total"] == N_IMAGES + 1 - 5  # + the truncated PNG
    assert not json.loads((project / STATE_FILE).read_text())["running"]
    with _client(data, project, resume=True) as c:  # finished: nothing to resume
        assert c.get("/api/propose").json()["state"] == "idle"


def test_stop_endpoint_and_shutdown_keep_the_run_resumable(data, tmp_path):
    project = tmp_path / "project"
    with _client(data, project) as c:
        _enrolled(c, data)
        labeller = c.app.state.labeller
        labeller.job.batch_size, labeller.job.chunk_images = 1, 1
        c.post("/api/propose", json={})
        stopped = c.delete("/api/propose").json()
        assert stopped["state"] in ("stopped", "done")
        assert not json.loads((project / STATE_FILE).read_text())["running"]  # stopped by the person: not resumed
    with _client(data, project) as c:
        assert c.get("/api/propose").json()["state"] == "idle"


def test_reopen_an_export(client, data, tmp_path):
    _draw(client, 4, [{"box": [5, 5, 30, 30], "label": "cat"}])
    coco = client.post("/api/export", json={"format": "coco"}).json()["path"]
    images = Path(coco).parent / "images"
    with _client({**data, "images": images}, tmp_path / "again", annotations=coco) as c:
        boxes = c.get("/api/images/4/annotations").json()["boxes"]
        assert [b["label"] for b in boxes] == ["cat"] and boxes[0]["box"] == [5, 5, 30, 30]
    shutil.rmtree(tmp_path / "again")
    with pytest.raises(DataError, match="missing.json"):
        create_app(data["images"], data["checkpoint"], tmp_path / "again", annotations=tmp_path / "missing.json")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(data, images, project, port):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fewsight.cli", "app", "--images", str(images), "--checkpoint",
           str(data["checkpoint"]), "--project", str(project), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            return proc, httpx.get(f"http://127.0.0.1:{port}/api/status", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start")


@pytest.mark.slow
def test_killed_server_resumes_proposals(data, tmp_path):
    """A real server killed (SIGKILL) during a proposal run: annotations intact, the next server resumes."""
    import httpx

    images = tmp_path / "many"
    images.mkdir()
    for i in range(300):  # enough work that the run is still going when the first chunk lands
        shutil.copyfile(data["images"] / f"c{i % N_IMAGES:02d}.png", images / f"m{i:03d}.png")
    project = tmp_path / "project"
    with TestClient(create_app(images, data["checkpoint"], project)) as c:
        _enrolled(c, data)
    before = (project / "annotations.json").read_bytes()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc, _ = _serve(data, images, project, port)
    try:
        assert httpx.post(f"{url}/api/propose", json={}).status_code == 200
        end = time.monotonic() + 60
        while not list((project / "proposals").glob("chunk-*.json")) and time.monotonic() < end:
            time.sleep(0.005)
        proc.kill()
        proc.wait()
    finally:
        proc.kill()
    chunks = {p.name: p.read_bytes() for p in (project / "proposals").glob("chunk-*.json")}
    done = sum(len(json.loads(b)["images"]) for b in chunks.values())
    assert chunks and done < 300, "the run ended before the kill: nothing to resume"
    assert json.loads((project / STATE_FILE).read_text())["running"] is True
    assert (project / "annotations.json").read_bytes() == before
    proc, status = _serve(data, images, project, port)
    try:
        assert status["enrolled"] == ["8"] and status["boxes"] == 3
        end = time.monotonic() + 120
        while (p := httpx.get(f"{url}/api/propose").json())["state"] == "running" and time.monotonic() < end:
            time.sleep(0.1)
        assert p["state"] == "done" and p["done"] == p["total"] == 300 and p["run_total"] == 300 - done
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert all((project / "proposals" / n).read_bytes() == b for n, b in chunks.items())
    assert (project / "annotations.json").read_bytes() == before
