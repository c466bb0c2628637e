"""The real-browser helpers of tests/browser.py, checked on self-made pages: a decoded data-URI image
counts as loaded, a broken one is detected, a blank page is blank, and every URL-bearing attribute
(src, href, srcset, style url()) is found."""

from __future__ import annotations

import base64
import io

import numpy as np
from browser import (
    assert_not_blank,
    broken_images,
    console_errors,
    data_attributes,
    external_text,
    external_urls,
    images,
    loaded_images,
    open_page,
    pixel_std,
    screenshot,
    url_attributes,
)

CSP = ("<meta http-equiv=\"Content-Security-Policy\" "
       "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">")


def _png_data_uri(size=(64, 48)) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _page(tmp_path, body: str, name="page.html"):
    path = tmp_path / name
    head = f"<meta charset='utf-8'>{CSP}"
    path.write_text(f"<!doctype html><html><head>{head}</head><body>{body}</body></html>", encoding="utf-8")
    return path


def test_loaded_and_broken_images_and_data_attributes(browser, tmp_path):
    good = _png_data_uri()
    page = _page(tmp_path, (
        f"<figure class='result' data-rank='1' data-same-eye='true'><img class='thumb' src='{good}'>"
        "</figure>"
        f"<figure class='result' data-rank='2' data-same-eye='unknown'><img class='thumb' src='{good}'>"
        "</figure>"
        "<figure class='result' data-rank='3' data-same-eye='false'>"
        "<img class='thumb broken' src='data:image/png;base64,iVBORw0KGgoAAAAbroken'></figure>"))
    open_page(browser, page)
    assert len(images(browser)) == 3
    loaded = loaded_images(browser)
    assert [(i["width"], i["height"]) for i in loaded] == [(64, 48), (64, 48)]
    broken = broken_images(browser)
    assert len(broken) == 1 and broken[0]["cls"] == "thumb broken" and broken[0]["width"] == 0
    assert len(loaded_images(browser, "img.thumb:not(.broken)")) == 2
    assert data_attributes(browser, "figure.result") == [
        {"rank": "1", "sameEye": "true"}, {"rank": "2", "sameEye": "unknown"},
        {"rank": "3", "sameEye": "false"}]
    assert external_urls(browser) == []


def test_screenshot_of_a_page_with_an_image_is_not_blank_and_a_blank_page_is(browser, tmp_path):
    open_page(browser, _page(tmp_path, "", name="blank.html"))
    blank = screenshot(browser, tmp_path / "blank.png")
    assert blank.shape[1] == 1280 and pixel_std(blank) == 0.0
    assert (tmp_path / "blank.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    open_page(browser, _page(tmp_path, f"<h1>report</h1><img src='{_png_data_uri((300, 200))}'>"))
    shown = screenshot(browser)
    assert_not_blank(shown)
    assert pixel_std(shown) > 10


def test_every_url_bearing_attribute_is_found_and_csp_blocks_the_external_ones(browser, tmp_path):
    good = _png_data_uri((8, 8))
    page = _page(tmp_path, (
        "<style>.a { background: url('https://example.invalid/bg.png') }</style>"
        f"<img src='{good}'>"
        "<img src='http://example.invalid/x.png'>"
        "<img srcset='//example.invalid/a.png 1x, data:image/png;base64,AAAA 2x' src='" + good + "'>"
        "<a href='#top'>top</a> <a href='file:///etc/passwd'>f</a>"
        "<div class='a' style=\"background-image: url(relative/pic.png)\">x</div>"))
    open_page(browser, page)
    found = {url for _, url in url_attributes(browser)}
    assert {"http://example.invalid/x.png", "//example.invalid/a.png", "data:image/png;base64,AAAA",
            "file:///etc/passwd", "relative/pic.png", "https://example.invalid/bg.png", "#top"} <= found
    external = sorted(url for _, url in external_urls(browser))
    assert external == ["//example.invalid/a.png", "file:///etc/passwd", "http://example.invalid/x.png",
                        "https://example.invalid/bg.png", "relative/pic.png"]
    # The page's CSP (the report's) refuses the fetch: the browser reports it, nothing leaves the machine.
    errors = console_errors(browser)
    assert any("Content Security Policy" in e and "example.invalid/x.png" in e for e in errors), errors


def test_external_text_ignores_base64_but_finds_schemes_and_tags():
    uri = "data:image/png;base64,ab//cd+/=="
    assert external_text(f"<img src='{uri}'><p>ok</p>") == []
    hits = external_text(f"<img src='{uri}'><a href='https://x.org'>x</a><script>1</script>")
    assert len(hits) == 2 and "https:" in hits[0] and "<script" in hits[1]
