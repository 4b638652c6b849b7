"""The HTML report, rendered by a real headless Chromium: counts in the DOM, every image decoded."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope.runtime.cli import main
from defectscope.runtime.heatmap import colormap, overlay
from onnx_models import build_model, make_image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
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


def chromium(tmp_path: Path, page: Path, *mode: str) -> subprocess.CompletedProcess[str]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (Debian package 'chromium')")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *mode, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def text_of(dom: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert m, f"no element #{element_id} in the DOM"
    return m.group(1)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    d = tmp_path_factory.mktemp("report")
    model = build_model(d / "m.onnx")
    for i in range(14):
        make_image(d / "imgs" / f"part_{i:02d}.png", 96 + 16 * (i % 3), 80, bright=i % 2 == 0, seed=i)
    (d / "imgs" / "zero.png").write_bytes(b"")
    (d / "imgs" / "bad<name>.png").write_text("not an image")  # must be escaped in the HTML
    out = d / "r.jsonl"
    rc = main(
        [
            str(model),
            str(d / "imgs"),
            "-o",
            str(out),
            "--report",
            str(d / "report.html"),
            "--heatmaps",
            str(d / "hm"),
        ]
    )
    assert rc == 1
    return d / "report.html", [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.slow
def test_report_renders_in_chromium_with_counts_and_decoded_images(
    report: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    page, rows = report
    html = page.read_text()
    assert not re.search(r"https?://", html), "the report must not reference any URL"
    assert "<link" not in html and "<script src" not in html and "<iframe" not in html
    assert "bad&lt;name&gt;.png" in html

    r = chromium(tmp_path, page, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    n_ng = sum(row["verdict"] == "NG" for row in rows)
    n_ok = sum(row["verdict"] == "OK" for row in rows)
    n_err = sum(row["status"] == "error" for row in rows)
    assert (n_ok, n_err) != (0, 0) and n_ng > 0
    assert text_of(dom, "count-total") == str(len(rows))
    assert text_of(dom, "count-ok") == str(n_ok)
    assert text_of(dom, "count-ng") == str(n_ng)
    assert text_of(dom, "count-error") == str(n_err)
    assert dom.count('class="ng-item"') == n_ng
    assert dom.count('class="error-item"') == n_err
    imgs = re.findall(r"<img [^>]*>", dom)
    assert len(imgs) == 2 * n_ng  # thumbnail + CAM overlay per NG item
    assert all('data-decoded="1"' in tag for tag in imgs)
    assert f'data-images-decoded="{len(imgs)}"' in dom
    assert dom.count('class="bar-ng"') >= 1 and dom.count('class="bar-ok"') >= 1

    shot = tmp_path / "shot.png"
    r = chromium(tmp_path, page, f"--screenshot={shot}", "--window-size=1200,1400", "--hide-scrollbars")
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    hot = (px[..., 0] > 200) & (px[..., 1] < 150) & (px[..., 2] < 150)  # red of NG text, bars and heat
    cold = px[..., 2] - px[..., 0] > 20  # blue tint of the colour map's cold end: overlays were painted
    assert hot.sum() > 500 and cold.sum() > 500


@pytest.mark.slow
def test_decoded_check_detects_a_broken_image(tmp_path: Path) -> None:
    """Negative control: the DOM check above would catch an image the browser cannot decode."""
    page = tmp_path / "broken.html"
    from defectscope.runtime.report import _MARK_DECODED

    page.write_text(
        '<!DOCTYPE html><html><body><img id="a" src="data:image/png;base64,iVBORw0KGgoAAAAN">'
        f"<script>{_MARK_DECODED}</script></body></html>"
    )
    dom = chromium(tmp_path, page, "--dump-dom").stdout
    assert 'data-decoded="0"' in dom and 'data-images-decoded="0"' in dom


def test_report_keeps_at_most_k_items(tmp_path: Path) -> None:
    model = build_model(tmp_path / "m.onnx")
    for i in range(8):
        make_image(tmp_path / "imgs" / f"{i}.png", 64, 64, bright=True, seed=i)
    page = tmp_path / "r.html"
    rc = main(
        [
            str(model),
            str(tmp_path / "imgs"),
            "-o",
            str(tmp_path / "r.jsonl"),
            "--report",
            str(page),
            "--report-items",
            "3",
        ]
    )
    assert rc == 0
    html = page.read_text()
    assert html.count('class="ng-item"') == 3 and "Showing the 3 NG items" in html
    probs = [float(p) for p in re.findall(r"P\(defect\) ([0-9.]+)</span>", html)]
    assert probs == sorted(probs, reverse=True)  # the most confident defects are the ones kept


def test_colormap_and_overlay() -> None:
    cm = colormap(np.array([0.0, 0.5, 1.0]))
    assert cm.shape == (3, 3) and cm.dtype == np.uint8
    assert cm[0, 2] > cm[0, 0] and cm[2, 0] > cm[2, 2]  # blue at 0, red at 1
    img = np.full((40, 60, 1), 100, np.uint8)
    cam = np.zeros((10, 15), np.float32)
    cam[2, 3] = 5.0
    ov = overlay(img, cam)
    assert ov.shape == (40, 60, 3)
    hot_y, hot_x = np.unravel_index(np.argmax(ov[..., 0].astype(int) - ov[..., 2]), ov.shape[:2])
    assert abs(hot_y - 2 * 4 - 2) <= 4 and abs(hot_x - 3 * 4 - 2) <= 4  # hot spot lands where the CAM peaks
