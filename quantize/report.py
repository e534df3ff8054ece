"""``report.html``: a self-contained page about one quantization run, written into the checkpoint.

``report.json`` holds the data (settings, wall time, peak memory, bits per weight, per-block and
per-layer errors, GSQ loss logs, perplexities added by ``gsq-eval``); ``report.html`` is rendered
from it with matplotlib plots embedded as base64 PNGs, so it opens anywhere without other files.
Both are written to a temporary name and renamed.

Per-layer error is the *diagonal-Hessian-weighted* relative weight error
``sum_k H_kk |dW[:,k]|^2 / sum_k H_kk |W[:,k]|^2`` (H = the layer's calibration-input Hessian):
a cheap stand-in for the relative output error that needs only diag(H) (K floats per layer).
For GSQ it is given for the GPTQ init and for GSQ's result; RTN computes no Hessian, so none.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


def layer_error(w, q, hdiag) -> float:
    """Diagonal-Hessian-weighted relative error of quantized ``q`` (a QuantizedWeight) against f32 ``w`` [N, K]."""
    dw = q.dequantize().to(w.device) - w
    num = (dw.pow(2).sum(0) * hdiag).sum().item()
    den = (w.pow(2).sum(0) * hdiag).sum().item()
    return num / max(den, 1e-30)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(data: dict) -> list[tuple[str, str]]:
    """[(title, base64 PNG)] for the report's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = []
    blocks = data.get("blocks", [])
    if blocks:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.semilogy([b["index"] for b in blocks], [max(b["rel_output_mse"], 1e-12) for b in blocks], "o-", ms=3)
        ax.set_xlabel("block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("relative output MSE")
        ax.set_title("Block output error after quantization (calibration inputs)")
        fig.tight_layout()
        out.append(("Block output error", _png(fig)))
        plt.close(fig)
    layers = [(b["index"], n, e) for b in blocks for n, e in b.get("layers", {}).items()]
    if layers:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        names = sorted({n for _, n, _ in layers})
        for n in names:
            pts = [(i, e) for i, m, e in layers if m == n]
            ax.semilogy([p[0] for p in pts], [max(p[1]["final"], 1e-12) for p in pts], "o-", ms=3, label=n)
            if any("init" in p[1] for p in pts):
                ax.semilogy([p[0] for p in pts if "init" in p[1]], [max(p[1]["init"], 1e-12) for p in pts
                                                                     if "init" in p[1]], "x:", ms=3, alpha=0.6)
        ax.set_xlabel("block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("rel. weight error (diag-H)")
        ax.set_title("Per-layer error (solid: result; dotted x: GPTQ init, where GSQ ran)")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        out.append(("Per-layer error", _png(fig)))
        plt.close(fig)
    # Blocks trained as a whole (a sparse block's experts are trained one by one and not drawn).
    logs = {k: v for k, v in data.get("gsq_logs", {}).items() if "steps" in v}
    if logs:
        fig, ax = plt.subplots(figsize=(8, 4))
        items = sorted(logs.items(), key=lambda kv: int(kv[0].rsplit(".", 1)[-1]))
        for c, (prefix, log) in enumerate(items):
            color = plt.cm.viridis(c / max(len(items) - 1, 1))
            ax.plot([s["step"] for s in log["steps"]], [s["soft_mse"] for s in log["steps"]], color=color, lw=0.8)
            scored = log.get("scored_epochs", range(len(log["hard_mse"])))  # older logs: every epoch
            per_epoch = log["total_steps"] / max(scored[-1], 1)
            ax.plot([e * per_epoch for e in scored], log["hard_mse"], "o--", color=color, ms=3, lw=0.6)
        ax.set_yscale("log")
        ax.set_xlabel("GSQ step within the block")
        ax.set_ylabel("block output MSE")
        ax.set_title("GSQ loss per block (solid: soft; dashed o: hard, per epoch; dark = early blocks)")
        fig.tight_layout()
        out.append(("GSQ loss curves", _png(fig)))
        plt.close(fig)
    return out


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows) + \
        "</table>"


def render_html(data: dict) -> str:
    s = data.get("settings", {})
    summary = [
        ("model", str(data.get("model", "?"))),
        ("method", f"{s.get('method')} {s.get('bits')}-bit, group size {s.get('group_size')}"),
        ("bits per weight", f"{data.get('bits_per_weight', float('nan')):.3f} over {data.get('quantized_weights', 0):,} "
                            "quantized weights"),
        ("wall time", f"{data.get('wall_s', 0) / 60:.1f} min"),
        ("peak memory (host RSS)", f"{data.get('peak_rss_gib', float('nan')):.2f} GiB"),
        ("device", str(data.get("device", "?"))),
    ]
    for row in data.get("perplexity", []):
        summary.append((f"perplexity ({row['kind']})", f"{row['ppl']:.3f} on {row['tokens']} {row['corpus']} tokens"))
    settings = [(k, json.dumps(v)) for k, v in sorted(s.items())]
    settings += [(f"gsq.{k}", json.dumps(v)) for k, v in sorted((data.get("gsq_options") or {}).items())]
    blocks = data.get("blocks", [])
    def num(v):
        return "" if v is None else f"{v:.3e}"

    def kept(b):
        return {None: "", 0: "init"}.get(b.get("gsq_kept"), f"epoch {b.get('gsq_kept')}")

    block_rows = "".join(
        f"<tr><td>{b['index']}</td><td>{b['rel_output_mse']:.3e}</td><td>{num(b.get('gsq_init_mse'))}</td>"
        f"<td>{num(b.get('gsq_final_mse'))}</td><td>{kept(b)}</td><td>{len(b.get('layers', {}))}</td></tr>"
        for b in blocks)
    figures = "".join(f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,{p}'>"
                      for t, p in _plots(data))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>gsq-quantize report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}} table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%}} img{{max-width:100%}}</style>
</head><body>
<h1>gsq-quantize report</h1>
{_table(summary)}
{figures}
<h2>Blocks</h2>
<table><tr><th>block</th><th>rel. output MSE</th><th>GSQ hard MSE, init</th><th>GSQ hard MSE, kept</th>
<th>GSQ kept</th><th>linears</th></tr>{block_rows}</table>
<h2>Settings</h2>
{_table(settings)}
</body></html>
"""


def write_report(folder: str | os.PathLike, data: dict) -> Path:
    """Write ``report.json`` and ``report.html`` into ``folder``; return the HTML path."""
    folder = Path(folder)
    _atomic_write(folder / REPORT_JSON, json.dumps(data, indent=2, sort_keys=True))
    _atomic_write(folder / REPORT_HTML, render_html(data))
    return folder / REPORT_HTML


def add_perplexity(folder: str | os.PathLike, row: dict) -> bool:
    """Record a gsq-eval row in a checkpoint's report (and re-render it); False if it has none."""
    path = Path(folder) / REPORT_JSON
    if not path.is_file():
        return False
    data = json.loads(path.read_text())
    key = (row["kind"], row["corpus"], row["seqlen"])
    data["perplexity"] = [r for r in data.get("perplexity", [])
                          if (r.get("kind"), r.get("corpus"), r.get("seqlen")) != key] + [row]
    write_report(folder, data)
    return True
