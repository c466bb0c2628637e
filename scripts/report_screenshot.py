"""Screenshot an HTML report in headless Chromium for the README (docs/report-retrieve.png).

    RETINA_HOME=/tmp/rdemo/home retina demo --workdir /tmp/rdemo/retina-demo --preset tiny --patients 24
    (cd /tmp/rdemo/retina-demo && RETINA_HOME=/tmp/rdemo/home retina retrieve fundus.png --top 5 \\
        --html report.html)
    python scripts/report_screenshot.py /tmp/rdemo/retina-demo/report.html docs/report-retrieve.png

The whole page at 1280 px wide (the browser of tests/browser.py: Debian's chromium + chromium-driver),
the empty background below the content cropped, reduced to 128 colours so the PNG stays small.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from browser import open_page, screenshot, start_browser


def main(report: str, out: str, colours: int = 128) -> None:
    driver = start_browser()
    try:
        open_page(driver, Path(report))
        pixels = screenshot(driver)
    finally:
        driver.quit()
    # rows that differ from the page background (its bottom-right pixel); keep a small margin below
    rows = np.nonzero((np.abs(pixels.astype(int) - pixels[-1, -1].astype(int)).sum(-1) > 0).any(1))[0]
    pixels = pixels[: rows[-1] + 24]
    image = Image.fromarray(pixels).quantize(colors=colours, method=Image.Quantize.MEDIANCUT,
                                             dither=Image.Dither.NONE)
    image.save(out, optimize=True)
    print(f"{out}: {image.width}x{image.height}, {Path(out).stat().st_size // 1024} KiB")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/report_screenshot.py REPORT.html OUT.png")
    main(sys.argv[1], sys.argv[2])
