"""report.html: written by gsq-quantize into the checkpoint, self-contained, updated by gsq-eval.

No browser can be installed on this machine (Playwright's Chromium download host does not
resolve), so the page is checked by parsing it: its summary rows, and every embedded PNG decodes
to a real image.
"""

import base64
import io
import json
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
