"""The HTML report: self-contained, every figure decodes, and it renders in headless Chromium."""

import base64
import io
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory):
    import numpy as np
    from conftest import write_png  # noqa: F401  (tiny data comes from the tiny_folder layout)

    det, _, files = tiny_run
    root = tmp_path_factory.mktemp("labelled")
    for f in files[:3]:
        (root / "good").mkdir(exist_ok=True)
        shutil.copy(f, root / "good" / f.name)
    img = np.asarray(Image.open(files[0])).copy()
    img[10:30, 10:30] = 255
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[10:30, 10:30] = 255
    write_png(root / "scratch" / "000.png", img)
    write_png(root / "ground_truth" / "scratch" / "000_mask.png", mask)
    out = tmp_path_factory.mktemp("report")
    metrics = det.test(root, report_dir=out)
    return out / "index.html", metrics


def test_report_is_self_contained_and_figures_decode(report):
    page, metrics = report
    assert metrics["report"] == str(page)
    text = page.read_text()
    assert "Metrics" in text and "Worst cases" in text and "image_auroc" in text
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert len(sources) >= 3 + 4 * 4  # curves + histogram + 4 panels per case
    for src in sources:
        assert src.startswith("data:image/png;base64,")  # nothing fetched from anywhere
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report, tmp_path):
    page, _ = report
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it")
        pytest.skip("chromium not installed")
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(base + ["--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert m, dom.stderr[-2000:]
    assert m.group(1) == m.group(2) and int(m.group(2)) > 0
    shot = tmp_path / "shot.png"
    subprocess.run(base + [f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
                   capture_output=True, timeout=120)  # fmt: skip
    im = Image.open(shot).convert("L")
    assert im.size == (1000, 1400)
    assert im.getextrema()[0] < 100  # something dark was drawn on the white page
