"""report.html: written by gsq-quantize into the checkpoint, self-contained, updated by gsq-eval.

The page is checked by parsing it (its summary rows, every embedded PNG decodes to a real image)
and by rendering it in headless Chromium (Debian's `chromium-headless-shell`, which
scripts/setup_env.sh installs where it can): the browser must decode every plot and lay it out
at its size, and its screenshot must not be blank.
"""

import base64
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from quantize.cli import main as quantize_main
from quantize.eval_cli import main as eval_main
from quantize.tiny import build_tiny_llama


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.cells, self.title = [], [], ""
        self._in = None

    def handle_starttag(self, tag, attrs):
        self._in = tag
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in in ("th", "td") and data.strip():
            self.cells.append(data.strip())
        if self._in == "title":
            self.title += data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("rep") / "model", layers=2)


def _images(page):
    import matplotlib.image as mpimg

    out = []
    for src in page.images:
        assert src.startswith("data:image/png;base64,")  # embedded, nothing fetched
        out.append(mpimg.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png"))
    return out


def test_gsq_report_renders_with_plots_and_gets_the_perplexity(tiny, tmp_path):
    out = tmp_path / "q"
    assert quantize_main(["--model", str(tiny), "--out", str(out), "--method", "gsq", "--bits", "2",
                          "--group-size", "32", "--nsamples", "4", "--seqlen", "64", "--preset", "fast",
                          "--gsq-epochs", "1"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert [b["index"] for b in data["blocks"]] == [0, 1]
    assert set(data["blocks"][0]["layers"]) == {f"self_attn.{p}_proj" for p in "qkvo"} | {
        f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert all({"init", "final"} <= set(e) for e in data["blocks"][0]["layers"].values())
    assert data["bits_per_weight"] == pytest.approx(2.5) and data["peak_rss_gib"] > 0
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert page.title == "gsq-quantize report"
    assert "bits per weight" in page.cells and "peak memory (host RSS)" in page.cells
    imgs = _images(page)
    assert len(imgs) == 3 and all(im.shape[0] > 100 and im.shape[1] > 100 for im in imgs)
    assert all(im.std() > 0.01 for im in imgs)  # not blank

    assert eval_main([str(tiny), str(out), "--nsamples", "2", "--seqlen", "64", "--no-progress"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert sorted(r["kind"] for r in data["perplexity"]) == ["bf16", "gsq-2b-g32"]
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert "perplexity (gsq-2b-g32)" in page.cells


def test_rtn_report_has_no_hessian_errors(tiny, tmp_path):
    out = tmp_path / "r"
    assert quantize_main(["--model", str(tiny), "--out", str(out), "--method", "rtn", "--bits", "3",
                          "--group-size", "32", "--nsamples", "4", "--seqlen", "64"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert all(b["layers"] == {} for b in data["blocks"]) and not data["gsq_logs"]
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert len(_images(page)) == 1  # the block error plot only


def _browser() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


# Appended to a copy of the page: after the load event, what the browser made of each image
# (decoded size, laid-out size) and of the page, written where --dump-dom shows it.
_PROBE = """<script>window.addEventListener('load', () => {
  const p = document.createElement('pre'); p.id = 'probe';
  p.textContent = JSON.stringify({
    images: [...document.images].map(i => ({complete: i.complete, natural: [i.naturalWidth, i.naturalHeight],
                                           shown: [i.clientWidth, i.clientHeight], alt: i.alt})),
    height: document.documentElement.scrollHeight, title: document.title});
  document.body.appendChild(p);
});</script></body>"""


def _render(browser: str, page, *args) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=5000", *args, page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(page.parent)})


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium (scripts/setup_env.sh installs "
                                               "chromium-headless-shell when run as root on Debian)")
def test_report_renders_in_a_browser_with_its_plots(tiny, tmp_path):
    import matplotlib.image as mpimg

    out = tmp_path / "q"
    assert quantize_main(["--model", str(tiny), "--out", str(out), "--method", "gsq", "--bits", "3",
                          "--group-size", "32", "--nsamples", "4", "--seqlen", "64", "--preset", "fast",
                          "--gsq-epochs", "1"]) == 0
    assert eval_main([str(tiny), str(out), "--nsamples", "2", "--seqlen", "64", "--no-progress"]) == 0
    html_text = (out / "report.html").read_text()
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(html_text.replace("</body>", _PROBE, 1))
    browser = _browser()
    dom = _render(browser, probe_page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    start = dom.stdout.index('<pre id="probe">') + len('<pre id="probe">')
    seen = json.loads(dom.stdout[start:dom.stdout.index("</pre>", start)].replace("&quot;", '"'))
    assert seen["title"] == "gsq-quantize report"
    assert [im["alt"] for im in seen["images"]] == ["Block output error", "Per-layer error", "GSQ loss curves"]
    for im in seen["images"]:  # decoded by the browser (a broken image has natural size 0) and shown
        assert im["complete"] and min(im["natural"]) > 100 and min(im["shown"]) > 100, im

    shot = tmp_path / "report.png"
    run = _render(browser, out / "report.html", f"--screenshot={shot}", f"--window-size=1000,{seen['height']}")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = mpimg.imread(shot)
    assert pixels.shape[0] == seen["height"] and pixels.shape[1] == 1000
    assert pixels[..., :3].std() > 0.05  # text, tables and plots, not a blank page
    keep = os.environ.get("GSQ_REPORT_SCREENSHOT")
    if keep:  # for a person to look at
        shutil.copy(shot, keep)
