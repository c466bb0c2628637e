"""Real-browser checks for the HTML reports: headless Chromium driven by Selenium.

The ``browser`` fixture (session) starts Debian's ``chromium`` through the system ``chromedriver``
(given explicitly, so Selenium Manager never tries to download a driver: CI has no internet) and skips
with the reason when the browser, the driver or Selenium is missing or the driver cannot start.
The helpers open a local report, screenshot it, and read what the page really shows: images that
decoded (``naturalWidth > 0``), data attributes, and every URL-bearing attribute. Scripts run by
WebDriver are allowed even where the page's Content-Security-Policy forbids page scripts.
$RETINA_TEST_CHROMIUM / $RETINA_TEST_CHROMEDRIVER point at another browser / driver binary.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = os.environ.get("RETINA_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RETINA_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
WINDOW = (1280, 1024)
INSTALL_HINT = "apt-get install chromium chromium-driver (what .ci/run does)"


def start_browser():
    """A headless Chromium WebDriver, or raise RuntimeError saying why it cannot start."""
    for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if not (Path(path).is_file() or shutil.which(path)):
            raise RuntimeError(f"{name} not found at {path}; {INSTALL_HINT}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        raise RuntimeError(f"selenium is not installed ({exc}); pip install -e '.[test]'") from exc
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars",
                "--force-device-scale-factor=1", "--no-first-run", "--disable-extensions",
                "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages, CSP violations
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except Exception as exc:  # any start failure is a reason to skip, shown in full
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(f"chromedriver could not start chromium: {first}") from exc
    driver.set_window_size(*WINDOW)
    return driver


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium for the whole session; skips with the reason when it cannot start."""
    try:
        driver = start_browser()
    except RuntimeError as exc:
        pytest.skip(f"real-browser test needs headless Chromium: {exc}")
    yield driver
    driver.quit()


def open_page(driver, path: Path) -> None:
    """Load a local file and wait until the document (images included) has finished loading."""
    driver.get_log("browser")  # drop messages of earlier pages: console_errors() reads this page's
    driver.get(Path(path).resolve().as_uri())
    state = driver.execute_script("return document.readyState")
    assert state == "complete", f"{path}: document.readyState is {state!r} after load"


def screenshot(driver, path: Path | None = None, full_page: bool = True) -> np.ndarray:
    """The page as an RGB array (the whole page when full_page: the window grows to the document)."""
    from PIL import Image

    if full_page:
        height = driver.execute_script(
            "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
        driver.set_window_size(WINDOW[0], max(WINDOW[1], int(height) + 150))
    try:
        png = driver.get_screenshot_as_png()
    finally:
        if full_page:
            driver.set_window_size(*WINDOW)
    if path is not None:
        Path(path).write_bytes(png)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def pixel_std(pixels: np.ndarray) -> float:
    """Standard deviation of the grey values (0 for a uniform page)."""
    return float(pixels.astype(np.float64).mean(axis=-1).std())


def assert_not_blank(pixels: np.ndarray, min_std: float = 10.0) -> None:
    """A rendered report has text and images: its grey values vary well above a blank page's 0."""
    std = pixel_std(pixels)
    assert std > min_std, f"screenshot looks blank: grey-value std {std:.2f} <= {min_std}"


_IMAGES = """
return Array.from(document.querySelectorAll(arguments[0])).map(img => ({
  cls: img.getAttribute('class') || '', alt: img.getAttribute('alt') || '',
  complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
  src: (img.getAttribute('src') || '').slice(0, 40)}));
"""


def images(driver, selector: str = "img") -> list[dict]:
    """Every img matching selector: class, alt, complete, naturalWidth/Height, start of src."""
    return driver.execute_script(_IMAGES, selector)


def loaded_images(driver, selector: str = "img") -> list[dict]:
    """The images that really decoded (a broken image has naturalWidth 0)."""
    return [i for i in images(driver, selector) if i["complete"] and i["width"] > 0]


def broken_images(driver, selector: str = "img") -> list[dict]:
    """The images the browser could not show."""
    return [i for i in images(driver, selector) if not (i["complete"] and i["width"] > 0)]


def data_attributes(driver, selector: str) -> list[dict[str, str]]:
    """The data-* attributes (as element.dataset: data-same-eye -> sameEye) of each matching element."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => Object.assign({}, e.dataset));",
        selector)


_URLS = """
const urls = [];
for (const el of document.querySelectorAll('*')) {
  for (const attr of el.attributes) {
    const name = attr.name.toLowerCase();
    if (['src', 'href', 'action', 'formaction', 'poster', 'data', 'background', 'xlink:href', 'cite',
         'manifest', 'ping', 'longdesc', 'codebase', 'content'].includes(name)) {
      if (name === 'content' && !/url=|^\\s*\\d+\\s*;/i.test(attr.value)) continue;  // only meta refresh
      urls.push([el.tagName.toLowerCase() + '@' + name, attr.value]);
    } else if (name === 'srcset' || name === 'imagesrcset') {
      // candidates "url [descriptor]" separated by commas; a data: url itself contains a comma
      for (const m of attr.value.matchAll(/\\s*(\\S+)(?:\\s+[^,\\s]+)?\\s*(?:,|$)/g)) {
        const url = m[1].replace(/,+$/, '');
        if (url) urls.push([el.tagName.toLowerCase() + '@' + name, url]);
      }
    } else if (name === 'style') {
      for (const m of attr.value.matchAll(/url\\(\\s*['"]?([^'")]*)/gi)) {
        urls.push(['style@' + el.tagName, m[1]]);
      }
    }
  }
}
for (const s of document.querySelectorAll('style')) {
  for (const m of s.textContent.matchAll(/url\\(\\s*['"]?([^'")]*)/gi)) urls.push(['style', m[1]]);
  for (const m of s.textContent.matchAll(/@import\\s+['"]([^'"]*)/gi)) urls.push(['style@import', m[1]]);
}
return urls;
"""


def url_attributes(driver) -> list[tuple[str, str]]:
    """(where, url) for every URL-bearing attribute of the page, style url() and @import included."""
    return [tuple(pair) for pair in driver.execute_script(_URLS)]


def is_local(url: str) -> bool:
    """Embedded (data:) or an in-page anchor (#...): nothing the browser would fetch."""
    url = url.strip()
    return url.startswith(("data:", "#")) or url == ""


def external_urls(driver) -> list[tuple[str, str]]:
    """The URL-bearing attributes that point outside the file (http:, https:, file:, //, relative paths)."""
    return [(where, url[:80]) for where, url in url_attributes(driver) if not is_local(url)]


_DATA_URI = re.compile(r"data:[\w/+.-]+(;[\w=.-]+)*(;base64)?,[A-Za-z0-9+/=%._-]*")
_EXTERNAL_TEXT = re.compile(r"(?:https?|file|ftp):(?://)?|//|<script|<link|<iframe|<object|<embed", re.I)


def external_text(html: str) -> list[str]:
    """Scheme-bearing or protocol-relative text, script/link/iframe tags in the raw file once the data
    URIs are taken out (base64 may contain '//')."""
    stripped = _DATA_URI.sub("data:", html)
    return [stripped[max(0, m.start() - 30):m.end() + 30] for m in _EXTERNAL_TEXT.finditer(stripped)]


def console_errors(driver) -> list[str]:
    """SEVERE console messages of the current page (failed loads, CSP violations, script errors)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
