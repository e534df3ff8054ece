"""The end-to-end stage's variants, on one checkpoint written without it, scored on the chat probe offline.

An experiment, not the product: ``quantize/e2e.py`` is the stage ``gsq-quantize --e2e-epochs``
runs. This script replays its math (every group scale as ``scales * (1 + d)``, codes fixed,
Adam with a cosine decay, 4 sequences a step, KL from the float model's next-token
distribution, here with the float model run forward at every step) and lets one thing at a
time change:

* ``--nseq`` / ``--epochs``: how many calibration sequences (chat-template wikipedia, as run.sh)
  and how many passes;
* ``--norms``: the RMSNorm weights train too (``--norm-lr``);
* ``--attn-lr``: the (bf16, not quantized) attention weights train too, at that lr;
* ``--data selfgen``: the sequences are sampled from the float model itself (temperature 1)
  from the chat template's system turn and an open user turn; ``mix``: half of each.

Before and after, it scores the 80 chat-probe questions offline as ``chat_probe_blocks.py``
does (float32 transformers, greedy): hits, and the mean NLL of the float model's own right
answers (smooth; moves before a greedy answer flips), plus perplexity on run.sh's 20x512
wikipedia evaluation. One thread by default, so two variants run side by side on 2 cores.

    python -m benchmarks.e2e_variants ~/.cache/gsq-vllm/models/SmolLM2-135M-Instruct-bf16 runs/x --norms \
        --out benchmarks/results/e2e_variants_norms.json
"""
import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from benchmarks import chat_probe_blocks as cpb
from benchmarks.results_io import add_common_args, machine_info, write_json
from gsq_format.format import load_tensors, read_quant_config, unpack_codes
from quantize.data import load_split, tokenize_sequences
from quantize.evaluate import load_model, perplexity
from quantize.models import resolve_model

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("bf16", help="the float model folder, or 'default' (the embedded SmolLM2)")
ap.add_argument("ckpt", help="a GSQ checkpoint written without the end-to-end stage")
ap.add_argument("--epochs", type=int, default=2, help="passes over the sequences")
ap.add_argument("--lr", type=float, default=2e-3, help="Adam lr on the scales' relative change")
ap.add_argument("--nseq", type=int, default=128, help="training sequences of 256 tokens")
ap.add_argument("--norms", action="store_true", help="train the RMSNorm weights too")
ap.add_argument("--norm-lr", type=float, default=None, help="their lr (default: --lr)")
ap.add_argument("--attn-lr", type=float, default=0.0, help="train the bf16 attention weights at this lr (0: off)")
ap.add_argument("--data", default="chat", choices=("chat", "selfgen", "mix"))
add_common_args(ap, None, flag="--out", threads=1)
args = ap.parse_args()
if not Path(args.ckpt).is_dir():
    ap.error(f"not a checkpoint folder: {args.ckpt}")
args.bf16 = str(resolve_model(args.bf16))
torch.set_num_threads(args.threads)
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(args.bf16)
teacher, _ = load_model(args.bf16)
student, kind = load_model(args.ckpt)
qcfg = read_quant_config(args.ckpt)
G = qcfg.group_size
tensors = load_tensors(args.ckpt)


class CodesLinear(torch.nn.Module):
    def __init__(self, codes, scales):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("s0", scales.float())
        self.d = torch.nn.Parameter(torch.zeros_like(self.s0))

    def forward(self, x):
        n, k = self.codes.shape
        s = self.s0 * (1 + self.d)
        w = (self.codes.float().view(n, k // G, G) * s.unsqueeze(-1)).view(n, k)
        return F.linear(x, w)


mods = {}
for name, t in tensors.items():
    if name.endswith(".qweight"):
        prefix = name[: -len(".qweight")]
        codes = unpack_codes(t, qcfg.bits)
        parent_name, child = prefix.rsplit(".", 1)
        m = CodesLinear(codes, tensors[prefix + ".scales"])
        setattr(student.get_submodule(parent_name), child, m)
        mods[prefix] = m
for p in student.parameters():
    p.requires_grad_(False)
groups = [{"params": [m.d for m in mods.values()]}]
if args.norms:
    groups.append({"params": [p for n, p in student.named_parameters() if "norm" in n],
                   "lr": args.norm_lr or args.lr})
if args.attn_lr:
    groups.append({"params": [p for n, p in student.named_parameters() if "self_attn" in n and n.endswith("weight")],
                   "lr": args.attn_lr})
for g in groups:
    for p in g["params"]:
        p.requires_grad_(True)
print(len(mods), "quantized linears;", sum(p.numel() for g in groups for p in g["params"]), "trained", flush=True)



@torch.no_grad()
def self_generated(model, n, seqlen, batch=16, seed=0):
    """n sequences sampled from the float model (temperature 1) from the chat template's system
    turn and an open user turn: its own conversations, end markers not stopping it."""
    gen = torch.Generator().manual_seed(seed)
    head = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    head = head[: head.index("<|im_start|>user")] + "<|im_start|>user\n"
    start = tok(head, add_special_tokens=False)["input_ids"]
    out = []
    for b in range(0, n, batch):
        m = min(batch, n - b)
        ids = torch.tensor([start] * m)
        o = model(input_ids=ids, use_cache=True)
        past, seqs = o.past_key_values, ids
        while seqs.shape[1] < seqlen:
            probs = torch.softmax(o.logits[:, -1].float(), -1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            seqs = torch.cat([seqs, nxt], 1)
            o = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = o.past_key_values
        out.append(seqs)
    return torch.cat(out)


if args.data == "selfgen":
    t1 = time.time()
    ids = self_generated(teacher, args.nseq, 256)
    print(f"generated {ids.shape} in {time.time()-t1:.0f}s", flush=True)
    for i in range(2):
        print(repr(tok.decode(ids[i][:160])), flush=True)
elif args.data == "mix":
    half = self_generated(teacher, args.nseq // 2, 256)
    ids = torch.cat([half, tokenize_sequences(load_split("wikipedia", "calib"), tok, 256, args.nseq - args.nseq // 2, chat=True)])
else:
    ids = tokenize_sequences(load_split("wikipedia", "calib"), tok, 256, args.nseq, chat=True)
ev = tokenize_sequences(load_split("wikipedia", "eval"), tok, 512, 20)
p_ids = cpb.prompts(tok)
pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
ref_hits, rp, ra = cpb.bf16_targets(teacher, tok, p_ids)
res = {"args": vars(args), "bf16_hits": sum(ref_hits), "machine": machine_info(), "date": time.strftime("%Y-%m-%d")}


def report(tag):
    student.eval()
    h = cpb.hits(tok, cpb.greedy_answers(student, tok, p_ids))
    nll = cpb.answer_nll(student, rp, ra, pad)
    with torch.inference_mode():
        ppl = perplexity(student, ev, progress=False)
    res[tag] = {"hits": sum(h), "nll": nll, "ppl": ppl, "hit_list": h}
    print(f"{tag}: hits {sum(h)}/80 (bf16 {sum(ref_hits)}) nll {nll:.4f} ppl {ppl:.3f}", flush=True)


report("before")
opt = torch.optim.Adam(groups, lr=args.lr)
bs = 4
nsteps = args.epochs * (len(ids) // bs)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / nsteps)))
step = 0
t0 = time.time()
for ep in range(args.epochs):
    perm = torch.randperm(len(ids))
    kl = 0.0
    for b in range(0, len(ids) - bs + 1, bs):
        x = ids[perm[b:b + bs]]
        with torch.no_grad():
            tlp = torch.log_softmax(teacher(input_ids=x).logits.float(), -1)
        sl = student(input_ids=x).logits.float()
        loss = F.kl_div(torch.log_softmax(sl, -1), tlp, log_target=True, reduction="batchmean") / x.shape[1]
        opt.zero_grad()
        loss.backward()
        opt.step(); sched.step(); step += 1
        kl += loss.item()
    print(f"epoch {ep+1}: mean kl {kl / (len(ids) // bs):.4f} {time.time()-t0:.0f}s", flush=True)
res["seconds"] = time.time() - t0
report("after")
if args.out:
    write_json(res, args.out)
