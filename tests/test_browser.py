"""The browser page, end to end in headless Chromium (Debian's, driven by Playwright) against a
live server with the pretrained dlib ResNet on LFW photos: verify two photos (one uploaded,
one dropped), enroll two people, identify a third photo; boxes drawn, screenshot saved. And the
People view of a served photo library: contact sheets, naming, merging, moving a face, undo,
a person's photos, checked through the Python API; screenshot saved."""

from __future__ import annotations

import base64
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from people_library import GROUP, build_library, person_of
from serving import KEYS, RO, RW, live_server

from facelab.collections import people
from facelab.collections.library import Library
from facelab.serve import ServeConfig, create_app

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
)
expect = sync_api.expect
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(
        "Debian's chromium is not installed (apt-get install chromium, as scripts/install.sh does)",
        allow_module_level=True,
    )

log = logging.getLogger(__name__)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Drop a file on a zone as a person would: a DataTransfer holding a File, on the drop event.
DROP = """([selector, name, b64]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const data = new DataTransfer();
    data.items.add(new File([bytes], name, { type: "image/jpeg" }));
    document.querySelector(selector).dispatchEvent(
        new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
}"""
# The colour of a canvas pixel, to see that a box was drawn where the server found the face.
PIXEL = """([selector, x, y]) => {
    const canvas = document.querySelector(selector);
    return Array.from(canvas.getContext("2d").getImageData(x, y, 1, 1).data.slice(0, 3));
}"""


@pytest.fixture(scope="module")
def model() -> Any:
    import facelab

    try:
        return facelab.load_model("dlib_resnet")
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))


@contextmanager
def open_page(app: Any, profile: Path) -> Iterator[tuple[Any, str, list[str]]]:
    """The page of a live server running `app`, in a fresh Chromium profile: (page, the
    server's URL, the JavaScript errors seen). Every request the page makes must go to the
    server (the page loads nothing from the network)."""
    with live_server(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(profile),  # a fresh user-data-dir
            executable_path=CHROMIUM,
            args=FLAGS,
            headless=True,
            viewport={"width": 1500, "height": 1000},
        )
        page = browser.new_page()
        errors: list[str] = []
        # JavaScript errors; the 401/403 answers the browser also logs are part of the test
        page.on(
            "console",
            lambda m: (
                errors.append(m.text)
                if m.type == "error" and not m.text.startswith("Failed to load resource")
                else None
            ),
        )
        page.on("pageerror", lambda e: errors.append(str(e)))
        elsewhere: list[str] = []
        page.on(
            "request",
            lambda r: (
                None if r.url.startswith((url, "data:", "blob:")) else elsewhere.append(r.url)
            ),
        )
        page.goto(url)
        yield page, url, errors
        browser.close()
    assert elsewhere == []


def use_key(page: Any, key: str) -> None:
    """Type a key and leave the field, as a person does: the page reloads on its change event
    (once: a change dispatched by hand would come again natively when the field loses focus)."""
    page.fill("#key", key)
    page.locator("#key").blur()


def test_page_verifies_enrolls_and_identifies(lfw: Path, tmp_path: Path, model: Any) -> None:
    powell = sorted((lfw / "images" / "Colin_Powell").glob("*.jpg"))
    blair = sorted((lfw / "images" / "Tony_Blair").glob("*.jpg"))
    app = create_app(model, ServeConfig(gallery=tmp_path / "gallery.db", keys=KEYS))
    with open_page(app, tmp_path / "profile") as (page, url, errors):
        # a read-only key may verify and identify but not enroll
        use_key(page, RO)
        page.fill("#enroll-name", "Colin Powell")
        page.set_input_files("#file-enroll", str(powell[0]))
        page.click("#enroll-go")
        expect(page.locator("#enroll-result .error")).to_contain_text("403 forbidden")
        use_key(page, RW)
        expect(page.locator("#status")).to_contain_text("dlib_resnet")
        page.fill("#threshold", "0.93")

        page.set_input_files("#file-a", str(powell[1]))
        page.evaluate(
            DROP, ["#drop-b", powell[2].name, base64.b64encode(powell[2].read_bytes()).decode()]
        )
        page.click("#verify-go")
        expect(page.locator("#verify-result .badge")).to_have_text("same person")

        for name, photos in (("Colin Powell", powell[:2]), ("Tony Blair", blair[:2])):
            page.fill("#enroll-name", name)
            page.set_input_files("#file-enroll", [str(p) for p in photos])
            page.click("#enroll-go")
            expect(page.locator("#enroll-result")).to_contain_text(f"enrolled {name}")
        expect(page.locator("#identities li")).to_have_count(2)

        page.set_input_files("#file-identify", str(powell[3]))
        page.click("#identify-go")
        expect(page.locator("#identify-result .badge")).to_have_text("Colin Powell")
        rows = page.locator("#identify-result tr").all_inner_texts()
        assert "Colin Powell" in rows[1] and "Tony Blair" in rows[2]

        # the face box the server found, drawn in green on the preview (LFW photos are 250 px
        # wide, shown at their own size)
        r = page.request.post(
            f"{url}/v1/identify",
            headers={"X-API-Key": RO},
            multipart={
                "image": {
                    "name": "p.jpg",
                    "mimeType": "image/jpeg",
                    "buffer": powell[3].read_bytes(),
                },
                "threshold": "0.93",
            },
        ).json()
        x1, y1, x2, y2 = r["faces"][0]["box"]
        edge = page.evaluate(PIXEL, ["#canvas-identify", round(x1), round((y1 + y2) / 2)])
        assert edge == [0x12, 0x80, 0x5C]

        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        log.info("screenshot of the page: %s", shot)
        expect(page.locator("#tab-people")).to_be_hidden()  # a gallery, not a library
    assert errors == []
    assert shot.stat().st_size > 10_000


def test_people_view_names_merges_moves_splits_and_undoes(
    lfw: Path, tmp_path: Path, model: Any
) -> None:
    library = build_library(lfw, tmp_path / "library", model)
    with Library(library) as lib:
        powell, serena, blair = (
            person_of(lib, n) for n in ("Colin_Powell", "Serena_Williams", "Tony_Blair")
        )
        blair_face = int(people.person_faces(lib, blair).ids[0])
        powell_faces = [int(i) for i in people.person_faces(lib, powell).ids]
    app = create_app(model, ServeConfig(gallery=library, library=True, keys=KEYS))
    with open_page(app, tmp_path / "profile") as (page, url, errors):
        card = lambda pid: page.locator(f'.person[data-id="{pid}"]')  # noqa: E731
        # a read-only key sees the people but cannot name them
        use_key(page, RO)
        page.click("#tab-people")
        expect(page.locator(".person")).to_have_count(3)
        expect(page.locator("#recognise")).to_be_hidden()
        expect(page.locator(".person").first).to_have_attribute("data-id", str(powell))
        expect(card(powell).locator(".sheet img")).to_have_count(4)  # largest first
        expect(card(serena).locator(".sheet img")).to_have_count(3)
        card(powell).locator(".name-input").fill("Colin Powell")
        card(powell).locator(".name-save").click()
        expect(page.locator("#people-result .error")).to_contain_text("403 forbidden")

        # the new key reloads the people: wait for the last contact sheet before typing
        last = page.locator(".person").last.get_attribute("data-id")
        with page.expect_response(lambda r: f"/v1/people/{last}/faces" in r.url):
            use_key(page, RW)
        expect(page.locator("#people-status")).to_contain_text("0 named, 3 unnamed clusters")
        card(powell).locator(".name-input").fill("Colin Powell")
        card(powell).locator(".name-input").press("Enter")
        expect(page.locator("#people-result")).to_contain_text("named Colin Powell")
        expect(card(powell)).to_have_class("person named")
        with Library(library) as lib:
            assert people.person_id(lib, "Colin Powell") == powell
            assert [i.name for i in lib.gallery.identities()] == ["Colin Powell"]

        card(serena).locator(".merge-other").select_option(str(blair))
        card(serena).locator(".merge-go").click()
        expect(page.locator(".person")).to_have_count(2)
        expect(card(serena).locator(".sheet img")).to_have_count(6)
        with Library(library) as lib:
            assert len(people.person_faces(lib, serena).ids) == 6

        card(serena).locator(f'.sheet img[data-id="{blair_face}"]').click()
        expect(page.locator("#face-panel")).to_be_visible()
        expect(page.locator("#face-about")).to_contain_text(f"face {blair_face} of person {serena}")
        page.select_option("#move-target", str(powell))
        page.click("#move-go")
        expect(card(powell).locator(".sheet img")).to_have_count(5)
        with Library(library) as lib:
            assert lib.face_details(blair_face)["person_id"] == powell

        page.click("#undo-go")
        expect(page.locator("#people-result")).to_contain_text(f"undone: move face {blair_face}")
        expect(card(serena).locator(".sheet img")).to_have_count(6)
        with Library(library) as lib:
            assert lib.face_details(blair_face)["person_id"] == serena

        card(serena).locator(f'.sheet img[data-id="{blair_face}"]').click()
        page.click("#ignore-go")
        expect(page.locator("#people-result")).to_contain_text(f"ignored face {blair_face}")
        expect(card(serena).locator(".sheet img")).to_have_count(5)
        with Library(library) as lib:
            assert lib.face_details(blair_face)["ignored"]
        page.click("#undo-go")
        expect(card(serena).locator(".sheet img")).to_have_count(6)

        # split: pick three of Powell's faces, unpick one, split the two off into a new person
        card(powell).locator(".split-mode").click()
        expect(card(powell).locator(".split-go")).to_be_disabled()
        for face in (*powell_faces[:3], powell_faces[2]):
            card(powell).locator(f'.sheet img[data-id="{face}"]').click()
        expect(card(powell).locator(".sheet img.picked")).to_have_count(2)
        expect(page.locator("#face-panel")).to_be_hidden()  # picking, not the face panel
        expect(card(powell).locator(".split-go")).to_have_text("Split 2 faces off")
        card(powell).locator(".split-go").click()
        expect(page.locator("#people-result")).to_contain_text("split 2 faces of ")
        expect(page.locator(".person")).to_have_count(3)
        listed = httpx.get(f"{url}/v1/people", headers={"X-API-Key": RO}).json()["people"]
        (new,) = [p["id"] for p in listed if p["id"] not in (powell, serena)]
        shown = httpx.get(f"{url}/v1/people/{new}/faces", headers={"X-API-Key": RO}).json()
        assert sorted(f["id"] for f in shown["faces"]) == sorted(powell_faces[:2])
        expect(card(new).locator(".sheet img")).to_have_count(2)
        expect(card(powell).locator(".sheet img")).to_have_count(2)
        page.click("#undo-go")
        expect(page.locator("#people-result")).to_contain_text(f"into person {new}")
        expect(card(powell).locator(".sheet img")).to_have_count(4)
        expect(page.locator(".person")).to_have_count(2)

        # the named person's photos: each with the face's thumbnail and its box
        card(powell).locator(".photos-go").click()
        photos = card(powell).locator(".photos li")
        expect(photos).to_have_count(4)
        expect(photos.filter(has_text=GROUP)).to_contain_text("box [")
        thumbs = card(powell).locator(".photos img")
        expect(thumbs).to_have_count(4)
        page.wait_for_function(
            "() => [...document.querySelectorAll('.photos img')].every(i => i.naturalWidth > 0)"
        )
        card(serena).locator(".sheet img").last.click()  # the face panel, shown in the screenshot
        shot = tmp_path / "people.png"
        page.screenshot(path=str(shot), full_page=True)
        log.info("screenshot of the People view: %s", shot)
    assert errors == []
    assert shot.stat().st_size > 10_000
