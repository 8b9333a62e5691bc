"""The browser page, end to end in headless Chromium (Debian's, driven by Playwright) against a
live server with the pretrained dlib ResNet on LFW photos: verify two photos (one uploaded,
one dropped), enroll two people, identify a third photo; boxes drawn, screenshot saved."""

from __future__ import annotations

import base64
import logging
import shutil
from pathlib import Path

import pytest
from serving import KEYS, RO, RW, live_server

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


def test_page_verifies_enrolls_and_identifies(lfw: Path, tmp_path: Path) -> None:
    import facelab

    try:
        model = facelab.load_model("dlib_resnet")
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    powell = sorted((lfw / "images" / "Colin_Powell").glob("*.jpg"))
    blair = sorted((lfw / "images" / "Tony_Blair").glob("*.jpg"))
    app = create_app(model, ServeConfig(gallery=tmp_path / "gallery.db", keys=KEYS))
    with live_server(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user-data-dir
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
        page.goto(url)
        # a read-only key may verify and identify but not enroll
        page.fill("#key", RO)
        page.dispatch_event("#key", "change")
        page.fill("#enroll-name", "Colin Powell")
        page.set_input_files("#file-enroll", str(powell[0]))
        page.click("#enroll-go")
        expect(page.locator("#enroll-result .error")).to_contain_text("403 forbidden")
        page.fill("#key", RW)
        page.dispatch_event("#key", "change")
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
        browser.close()
    assert errors == []
    assert shot.stat().st_size > 10_000
