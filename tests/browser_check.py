"""Open an HTML file in headless Chromium (Debian's ``chromium``) and report what a reader would meet: console
errors, images that did not load, contents links without their section, and a screenshot.

The page is checked through a copy with a small script appended that writes its findings into the DOM, which
``--dump-dom`` returns; console messages come from ``--enable-logging=stderr``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

PROBE = """
<script>
window.__errors = window.__errors || [];
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const links = Array.from(document.querySelectorAll('nav a[href^="#"]'));
  const result = {
    images: images.length,
    broken: images.filter(i => !i.complete || i.naturalWidth === 0 || i.naturalHeight === 0).map(i => i.alt),
    toc: links.length,
    missing: links.map(a => a.getAttribute('href').slice(1)).filter(id => !document.getElementById(id)),
    sections: document.querySelectorAll('section').length,
    errors: window.__errors,
  };
  const pre = document.createElement('pre');
  pre.id = 'hp-check';
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>
"""
CATCH = (
    "<script>window.__errors=[];window.addEventListener('error',e=>window.__errors.push(String(e.message)));</script>"
)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("chromium is not installed (apt-get install chromium)")


def _run(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=timeout, check=False)


def check_page(html: Path, scratch: Path) -> dict:
    """Load ``html`` in Chromium; returns images, broken images, contents links, missing ids, console errors."""
    text = html.read_text(encoding="utf-8")
    probed = scratch / f"probe-{html.name}"
    probed.write_text(text.replace("<head>", "<head>" + CATCH, 1).replace("</body>", PROBE + "</body>", 1))
    done = _run(
        ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom", probed.resolve().as_uri()]
    )
    found = re.search(r'<pre id="hp-check">(.*?)</pre>', done.stdout, re.S)
    if not found:
        raise AssertionError(f"chromium gave no probe result (exit {done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<"))
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    result["console"] = [line for line in console if "error" in line.lower() or "Uncaught" in line]
    return result


def screenshot(html: Path, png: Path, size: tuple[int, int] = (1280, 2400)) -> Path:
    """A screenshot of the top of ``html`` into ``png``."""
    done = _run(
        [f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", "--hide-scrollbars", html.resolve().as_uri()]
    )
    if not png.is_file():
        raise AssertionError(f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}")
    return png


def pixel_spread(png: Path) -> float:
    """Standard deviation of the screenshot's grey levels (0 for a blank page)."""
    from PIL import Image

    return float(np.asarray(Image.open(png).convert("L"), np.float64).std())
