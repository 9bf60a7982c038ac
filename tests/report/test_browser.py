"""report.html in a real headless Chromium: it renders, every image loads, nothing is logged as an error."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from headless_chromium import INSTALL_HINT, Chromium, find_chromium


@pytest.mark.browser
def test_report_html_renders_in_headless_chromium(tiny_study, tmp_path):
    exe = find_chromium()
    if exe is None:
        pytest.fail(INSTALL_HINT)
    out, results, _ = tiny_study
    broken = tmp_path / "broken.html"  # control: proves the checks below can fail
    broken.write_text('<!DOCTYPE html><html><head><title>b</title></head><body><img src="missing.png">'
                      '<script>console.error("boom")</script></body></html>')
    with Chromium(exe) as browser:
        page = browser.load(out / "report.html")
        control = browser.load(broken)

    assert page["errors"] == [], page["errors"]
    assert page["title"] == "pnnh depth study: quick" and page["h1"] == "Depth study: quick"
    assert len(page["images"]) == 4
    for img in page["images"]:
        assert img["complete"] and img["width"] > 300 and img["height"] > 200, img
        assert img["shown"] > 300, img  # laid out at a readable size
    assert page["tables"] >= 4 and page["scripts"] == 0
    assert "Verdict" in page["text"] and "At depth 8, " in page["text"]
    for r in results["runs"]:
        assert f"{r['test_acc'] * 100:.1f}%" in page["text"]
    shot = Image.open(io.BytesIO(page["screenshot"])).convert("L")
    lo, hi = shot.getextrema()
    assert shot.size == (1200, 900) and hi - lo > 100  # something was drawn, not a blank page

    assert control["images"][0]["width"] == 0
    assert any("boom" in e for e in control["errors"]) and any("missing.png" in e for e in control["errors"])
