"""One sparse (MoE) block, its routed experts streamed from disk one at a time.

A sparse block's experts can be most of a model (Kimi-K2: 384 experts, ~17B weights per
block), so the pipeline never holds them together. Per block:

1. Load everything but the routed experts (attention, norms, router, shared expert).
2. *Float pass* with the experts captured (quantize/moe.py, ``ExpertList.capture``): the
   block's output without the routed experts' sum goes to ``targets``; the sparse block's
   input rows (``moe_in``, ``[n,S,H]``) and the float router's choice (``Routing``) are kept;
   the non-expert linears' Hessians are accumulated.
3. If no non-expert linear is quantized, the quantized path equals the float path up to the
   experts: ``next`` starts as a copy of ``targets`` and one stream (4) does both.
   Otherwise: one stream adds the float experts to ``targets``; the non-expert linears are
   quantized (GPTQ / RTN / ``--init``; attention by the GSQ reference's procedure under GSQ,
   a shared expert by GPTQ only), and a second capture pass through them gives ``next`` and
   the experts' quantized-path inputs and routing.
4. *Stream*: for each expert, load its three weights, gather the rows routed to it, add its
   float output (router-weighted) to ``targets`` where that is still owed, then quantize it:
   Hessians over exactly its routed rows (``down``'s over ``act(gate) * up`` of them), RTN if
   fewer than ``moe_min_tokens`` rows, else GPTQ, then GSQ on the router-weighted expert
   output against the float expert's (other experts fixed, so this is the block output's
   error restricted to this expert); its codes go to the work folder at once, its quantized
   output is added to ``next``, and its weights go back to the meta device.

Memory: one expert's weights and Hessians, a chunk of its routed rows (``CHUNK_ROWS``), GSQ's
copy of its rows, and four ``[n,S,H]`` activations (inputs, targets, next, moe_in);
``quantize/activations.py`` spills the activations and GSQ's rows to files above the budget.
The router is float throughout, and the routing the experts are trained and propagated
with is the float router's on the quantized path's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantize.activations import Activations
from quantize.block_forward import QK, VO, run_block_with_hessians
from quantize.files import atomic_save
from quantize.moe import disk_name, expert_of, sparse_experts
from gsq_format.qtypes import QuantizedWeight
from quantize.report import layer_error

ACTIVATIONS_HELD = 4  # inputs, targets, next inputs, the sparse block's inputs
# Routed rows an expert's Hessians and outputs are computed over at once: bounds the [rows, I]
# intermediates whatever the calibration size (GSQ's copies of the rows follow the activations'
# budget: in memory or in files, quantize/activations.py).
CHUNK_ROWS = 16384


def expert_file(work_dir: Path, block: int, expert: int) -> Path:
    """Where one quantized expert's codes and scales wait for the final checkpoint."""
    return Path(work_dir) / f"block-{block:05d}.expert-{expert:05d}.safetensors"


@dataclass
class Routing:
    """The router's choice for every calibration token (flat index ``seq * S + pos``)."""

    ids: torch.Tensor  # int64 [T, k] expert ids
    weights: torch.Tensor  # float32 [T, k] the weights the block applies to their outputs
    _slices: dict = field(default_factory=dict, repr=False)

    def tokens_of(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat token indices int64 ``[T_e]``, ascending; their router weights f32 ``[T_e]``)."""
        if not self._slices:  # one sort for all experts instead of one scan of [T, k] each
            flat = self.ids.flatten()
            order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=int(flat.max()) + 1).tolist()
            start = 0
            for e, c in enumerate(counts):
                self._slices[e] = order[start:start + c]
                start += c
        pos = self._slices.get(expert, self.ids.new_zeros(0))
        k = self.ids.shape[1]
        tok = pos // k
        w = self.weights.flatten()[pos]
        order = torch.argsort(tok)
        return tok[order], w[order]


def _rows(a: Activations, tok: torch.Tensor) -> torch.Tensor:
    """Rows ``tok`` of ``a`` seen as ``[n*S, H]``, on the run's device."""
    flat = a.data.reshape(-1, a.shape[-1])
    return flat[tok.to(flat.device)].to(a.device)


def _add_rows(a: Activations, tok: torch.Tensor, values: torch.Tensor) -> None:
    flat = a.data.reshape(-1, a.shape[-1])
    flat.index_add_(0, tok.to(flat.device), values.to(flat.device, torch.float32))


def capture_pass(block, names: list[str], x: Activations, pos_emb, batch_size: int, out: Activations,
                 moe_in: Activations):
    """Run ``block`` over ``x`` without its routed experts: (``out`` = the block's output minus the
    routed experts' sum, :class:`Routing`, Hessians and counts of ``names`` as in
    :func:`run_block_with_hessians`); the sparse block's input rows land in ``moe_in``."""
    experts = sparse_experts(block)
    seq = x.shape[1]
    ids, weights, cursor = [], [], [0]

    def capture(hidden, top_k_index, top_k_weights):
        rows = hidden.detach().float()
        b = rows.shape[0] // seq
        moe_in[cursor[0]:cursor[0] + b] = rows.reshape(b, seq, -1)
        cursor[0] += b
        ids.append(top_k_index.detach().long())
        weights.append(top_k_weights.detach().float())

    experts.capture = capture
    try:
        out, hess, counts = run_block_with_hessians(block, names, x, pos_emb, batch_size, out)
    finally:
        experts.capture = None
    if cursor[0] != len(x):
        raise RuntimeError(f"the sparse block saw {cursor[0]} of {len(x)} sequences: does its forward call "
                           "its experts exactly once per batch?")
    return out, Routing(torch.cat(ids), torch.cat(weights)), hess, counts


@dataclass
class ExpertOutcome:
    rtn_experts: dict  # checkpoint name of an expert routed too few tokens -> its token count
    layer_errors: dict  # linear name in the block -> {"final", ("init")}
    gsq_logs: dict  # checkpoint name of the expert -> its GSQ log


class ExpertStream:
    """Loads, uses, quantizes and frees the routed experts of block ``index`` one at a time."""

    def __init__(self, pipe, block, index: int, names: list[str], refine, seqlen: int, space):
        self.pipe, self.s, self.seqlen, self.space = pipe, pipe.s, seqlen, space
        self.block, self.index = block, index
        self.prefix = f"model.layers.{index}"
        self.experts = sparse_experts(block)
        self.names = {e: [n for n in names if expert_of(n) == f"mlp.experts.{e}"] for e in range(len(self.experts))}
        self.refine = refine
        self.outcome = ExpertOutcome({}, {}, {})

    def run(self, float_in: tuple[Activations, Routing] | None, targets: Activations | None,
            quant_in: tuple[Activations, Routing] | None, nxt: Activations | None) -> ExpertOutcome:
        """For every expert: add its float output on ``float_in`` to ``targets`` (if given), and
        (if ``quant_in`` is given) quantize it and add its quantized output on ``quant_in`` to ``nxt``."""
        for e, expert in enumerate(self.experts):
            self.pipe.reader.load_into(expert, f"{self.prefix}.mlp.experts.{e}", device=self.pipe.device,
                                       arch=self.pipe.arch)
            if float_in is not None:
                self._accumulate(expert, float_in[0], *float_in[1].tokens_of(e), targets)
            if quant_in is not None:
                tok, w = quant_in[1].tokens_of(e)
                if self.names[e]:
                    self._quantize(e, expert, quant_in[0], tok, w)
                self._accumulate(expert, quant_in[0], tok, w, nxt)
            expert.to("meta")
        return self.outcome

    @staticmethod
    def _chunks(tok: torch.Tensor, w: torch.Tensor):
        for i in range(0, len(tok), CHUNK_ROWS):
            yield tok[i:i + CHUNK_ROWS], w[i:i + CHUNK_ROWS]

    def _accumulate(self, expert, moe_in: Activations, tok, w, out: Activations) -> None:
        """``out`` rows ``tok`` += the expert's output on them, times their router weights."""
        with torch.no_grad():
            for tc, wc in self._chunks(tok, w):
                _add_rows(out, tc, expert(_rows(moe_in, tc)) * wc[:, None])

    def _quantize(self, e: int, expert, moe_in: Activations, tok: torch.Tensor, w: torch.Tensor) -> None:
        s, pipe = self.s, self.pipe
        local = {n.rsplit(".", 1)[1]: n for n in self.names[e]}  # "gate_proj" -> "mlp.experts.3.gate_proj"
        name = disk_name(f"{self.prefix}.mlp.experts.{e}", pipe.arch)
        few = len(tok) == 0 or len(tok) < s.moe.min_tokens
        if few:
            self.outcome.rtn_experts[name] = len(tok)
        hess, inputs, want = self._scan_rows(e, expert, moe_in, tok, w, hessians=not few and s.method != "rtn",
                                             gsq=self.refine is not None and not few)
        result = {}
        for ln in local:
            weight = getattr(expert, ln).weight.data
            result[ln] = pipe.start_codes(weight, disk_name(f"{self.prefix}.{local[ln]}", pipe.arch), hess.get(ln),
                                          few_tokens=few)
            if ln in hess:
                hdiag = hess[ln].diagonal().clone()
                self.outcome.layer_errors[local[ln]] = {"final": layer_error(weight, result[ln], hdiag),
                                                        "hdiag": hdiag}
        hess = None
        if inputs is not None:
            h = moe_in.shape[-1]
            forward = lambda a: expert(a[..., :h]) * a[..., h:]  # noqa: E731  router weight in the last column
            refined, log = self.refine(expert, forward, list(result), result, inputs, want, pipe.gsq_options,
                                       s.seed * 1_000_003 + self.index * 4099 + e)
            for ln, q in refined.items():
                err = self.outcome.layer_errors.get(local[ln])
                if err is not None:
                    err["init"] = err["final"]
                    err["final"] = layer_error(getattr(expert, ln).weight.data, q, err["hdiag"])
            result.update(refined)
            self.outcome.gsq_logs[name] = log
            for a in (inputs, want):
                self.space.discard(a)
        for ln in local:
            self.outcome.layer_errors.get(local[ln], {}).pop("hdiag", None)
        with torch.no_grad():
            for ln, q in result.items():
                getattr(expert, ln).weight.copy_(q.dequantize())

        tensors = {}
        for ln, q in result.items():
            tensors[f"{local[ln]}.codes"] = q.codes.cpu()
            tensors[f"{local[ln]}.scales"] = q.scales.float().cpu()
        atomic_save(tensors, expert_file(pipe.work_dir, self.index, e))

    def _scan_rows(self, e: int, expert, moe_in: Activations, tok: torch.Tensor, w: torch.Tensor,
                   hessians: bool, gsq: bool):
        """One pass over the expert's routed rows, a chunk at a time, before any of its weights
        change: (``hessians``) the Hessians of its inputs (gate and up share one) and of down's
        input ``act(gate) * up``; (``gsq``) GSQ's training data, the rows from GSQ's training
        sequences as ``[c, r, H+1]`` inputs (router weight appended) and ``[c, r, H]`` weighted
        float outputs, ``c`` = as many pseudo-sequences as a dense block trains on (so the step
        count per epoch matches), zero-padded (a zero weight adds nothing to the loss), in
        activations like the block's (files when those are). Returns (Hessians by linear name or
        {}, inputs or None, targets or None)."""
        gate, up, down = (getattr(expert, n) for n in expert.names)
        h = moe_in.shape[-1]
        hess, inputs, want = {}, None, None
        if not (hessians or gsq):
            return hess, inputs, want
        if hessians:
            h_in = torch.zeros(h, h, device=self.pipe.device)
            h_act = torch.zeros(down.in_features, down.in_features, device=self.pipe.device)
            hess = dict(zip(expert.names, (h_in, h_in, h_act)))  # GPTQ copies what it changes
        if gsq:
            k = self.s.gsq.nsamples or self.s.nsamples
            limit = k * self.seqlen
            t = int((tok < limit).sum())
            c = max(1, min(k, t))
            r = -(-t // c)
            inputs = self.space.new(f"expert-{e}-inputs", (c, r, h + 1))
            want = self.space.new(f"expert-{e}-targets", (c, r, h))
            flat_in, flat_want = inputs.data.view(c * r, h + 1), want.data.view(c * r, h)
            flat_in[t:] = 0  # the padding
            flat_want[t:] = 0
            done = 0
        with torch.no_grad():
            for tc, wc in self._chunks(tok, w):
                rows = _rows(moe_in, tc)
                act = expert.act(gate(rows)) * up(rows)
                if hessians:
                    h_in.addmm_(rows.t(), rows)
                    h_act.addmm_(act.t(), act)
                if gsq:
                    keep = tc < limit
                    n = int(keep.sum())
                    flat_in[done:done + n, :h] = rows[keep].to(flat_in.device)
                    flat_in[done:done + n, h] = wc[keep].to(flat_in.device)
                    flat_want[done:done + n] = (down(act[keep]) * wc[keep, None]).to(flat_want.device)
                    done += n
        return hess, inputs, want


def quantize_moe_block(pipe, index: int, block, names: list[str], x: Activations, pos_emb, space, refine,
                       result: dict[str, QuantizedWeight], log):
    """Quantize sparse block ``index`` (its non-expert linears into ``result``, its experts into
    files in the work folder); returns (float targets, next block's inputs, ExpertOutcome, GSQ
    logs of the non-expert linears)."""
    s = pipe.s
    dense = [n for n in names if expert_of(n) is None]
    stream = ExpertStream(pipe, block, index, names, refine, x.shape[1], space)
    hess_names = dense if s.method != "rtn" else []
    moe_in = space.new("moe-inputs")
    targets, routing, hess, _ = capture_pass(block, hess_names, x, pos_emb, s.batch_size, space.new("targets"),
                                             moe_in)
    attention_logs = {}
    if not dense:
        nxt = space.new("next-inputs")
        for sl, t in targets.batches(s.batch_size):
            nxt[sl] = t
        path = (moe_in, routing)
        outcome = stream.run(path, targets, path, nxt)
        space.discard(moe_in)
        return targets, nxt, outcome, attention_logs
    stream.run((moe_in, routing), targets, None, None)  # targets complete: the float block's outputs
    space.discard(moe_in)

    attn = [n for n in dense if n in QK + VO]
    if refine is not None and attn:
        attention_logs = pipe.gsq_attention(block, attn, hess, x, pos_emb, space, result, refine, index)
    for n in dense:
        if n not in result:
            result[n] = pipe.start_codes(block.get_submodule(n).weight.data,
                                         disk_name(f"model.layers.{index}.{n}", pipe.arch), hess.get(n))
    hess = None
    with torch.no_grad():
        for n in dense:
            block.get_submodule(n).weight.copy_(result[n].dequantize())
    moe_in = space.new("moe-inputs")
    nxt, routing_q, _, _ = capture_pass(block, [], x, pos_emb, s.batch_size, space.new("next-inputs"), moe_in)
    outcome = stream.run(None, None, (moe_in, routing_q), nxt)
    space.discard(moe_in)
    return targets, nxt, outcome, attention_logs
