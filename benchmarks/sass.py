"""Read SASS (cuobjdump -sass) and find what a GEMM kernel's hot loop executes per iteration.

A static reading, not a profile: the hot loop is, among the innermost loops
holding tensor-core instructions, the one with the most of them; an iteration is a path from its head to
its back edge through the loop's own basic blocks (inner loops counted once,
branches out of the loop not taken). The longest such path is the steady
state of a pipelined GEMM loop (the branches inside skip loads that only the
last iterations leave out), so it is what ``executed`` reports; the shortest
is given too. Predicated instructions count as executed: they take an issue
slot either way.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sysconfig
from collections import Counter
from functools import lru_cache
from pathlib import Path

# Instruction classes of the model; the first matching prefix (of the opcode's base name) wins.
CLASSES = {
    "tensor": ("HMMA", "IMMA", "HGMMA", "IGMMA", "QGMMA", "BMMA", "DMMA"),
    "shared": ("LDSM", "STSM", "LDS", "STS", "ATOMS"),
    "global/async": ("LDGSTS", "LDGDEPBAR", "DEPBAR", "LDG", "STG", "RED", "ATOMG", "ATOM", "UTMA", "UBLKCP",
                     "SYNCS", "CCTL", "LD", "ST"),
    "fp16/fp32 math": ("HADD2", "HMUL2", "HFMA2", "HSET", "HMNMX", "FADD", "FMUL", "FFMA", "FSET", "FMNMX",
                       "F2F", "F2FP", "F2I", "I2F", "MUFU", "FRND", "FCHK", "HADD", "HMUL", "HFMA"),
    "control": ("BRA", "BRX", "JMP", "CALL", "RET", "EXIT", "BAR", "BSSY", "BSYNC", "WARPSYNC", "NOP", "YIELD",
                "MEMBAR", "ERRBAR", "BPT", "WARPGROUP", "ELECT", "VOTE"),
}
CLASS_NAMES = ["tensor", "shared", "global/async", "fp16/fp32 math", "integer/logic", "control"]

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_FUNC = re.compile(r"^\s*Function : (\S+)")


def classify(opcode: str) -> str:
    base = opcode.split(".")[0]
    for cls, prefixes in CLASSES.items():
        if any(base == p or base.startswith(p) for p in prefixes):
            return cls
    return "integer/logic"  # integer, logic, moves, predicates, uniform datapath, constants


@dataclasses.dataclass
class Instr:
    addr: int
    pred: str
    op: str
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    def branch_target(self) -> int | None:
        if self.base == "BRA":
            m = re.search(r"0x([0-9a-f]+)", self.args)
            return int(m.group(1), 16) if m else None
        return None

    @property
    def unconditional(self) -> bool:
        # BRA.DIV branches only when the warp has diverged; "BRA P0, target" carries its own predicate
        if self.op == "BRA.DIV" or re.match(r"!?P\d", self.args):
            return False
        return not self.pred.strip() or self.pred.strip() == "@PT"


# ------------------------------------------------------------------ tools


@lru_cache(maxsize=None)
def tool(name: str) -> str:
    """nvcc / cuobjdump / nvdisasm from PATH, the CUDA toolkit, or the nvidia-cuda-* wheels."""
    cands = [shutil.which(name), f"/usr/local/cuda/bin/{name}"]
    site = Path(sysconfig.get_paths()["purelib"]) / "nvidia"
    cands += [str(p) for p in sorted(site.glob(f"cu*/bin/{name}"))]
    for c in cands:
        if c and Path(c).exists():
            return c
    raise FileNotFoundError(f"{name} not found: install the CUDA toolkit (nvcc) and "
                            "`pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm` (the project's dev extra)")


def sass_functions(cubin: Path) -> dict[str, list[Instr]]:
    """Mangled function name -> instructions, from ``cuobjdump -sass``."""
    out = subprocess.run([tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    return parse_sass(out)


def parse_sass(out: str) -> dict[str, list[Instr]]:
    """``cuobjdump -sass`` text -> {mangled function name: instructions}."""
    funcs: dict[str, list[Instr]] = {}
    cur = None
    for line in out.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _LINE.search(line)
        if m and cur is not None:
            cur.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    return funcs


def resource_usage(cubin: Path) -> dict[str, dict[str, int]]:
    """Mangled name -> {REG, SHARED, LOCAL, STACK, ...} from ``cuobjdump -res-usage``."""
    out = subprocess.run([tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                         check=True).stdout
    res, name = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            res[name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            name = None
    return res


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


# ------------------------------------------------------------------ the hot loop


@dataclasses.dataclass
class LoopReport:
    head: int
    tail: int
    body_instructions: int  # static size of the loop's address range
    executed: int  # longest head -> back-edge path
    executed_min: int  # shortest
    tensor_ops: int  # on the longest path
    by_class: dict[str, int]
    by_opcode: dict[str, int]


def hot_loop(instrs: list[Instr]) -> LoopReport:
    by_addr = {ins.addr: i for i, ins in enumerate(instrs)}
    loops = []
    for i, ins in enumerate(instrs):
        t = ins.branch_target()
        if t is not None and t <= ins.addr and t in by_addr:
            lo = by_addr[t]
            mma = sum(classify(x.op) == "tensor" for x in instrs[lo : i + 1])
            loops.append((mma, -(i - lo), lo, i))
    loops = [lp for lp in loops if lp[0] > 0]
    # innermost: drop a loop that contains another tensor-op loop (persistent / tile loops around the k loop)
    inner = [a for a in loops if not any(b is not a and a[2] <= b[2] and b[3] <= a[3] for b in loops)]
    if not inner:
        raise ValueError("no loop with tensor-core instructions")
    _, _, lo, hi = max(inner)  # most tensor ops, then the smallest body
    body = instrs[lo : hi + 1]
    # basic blocks: leaders at the head, at forward targets inside, after every branch / exit
    leaders = {body[0].addr}
    for j, ins in enumerate(body):
        t = ins.branch_target()
        if t is not None and body[0].addr <= t <= body[-1].addr:
            leaders.add(t)
        if (t is not None or ins.base == "EXIT") and j + 1 < len(body):
            leaders.add(body[j + 1].addr)
    starts = sorted(leaders)
    blocks = []
    for bi, s in enumerate(starts):
        e = starts[bi + 1] if bi + 1 < len(starts) else body[-1].addr + 1
        blocks.append([ins for ins in body if s <= ins.addr < e])
    index = {blk[0].addr: bi for bi, blk in enumerate(blocks)}
    succ = []
    for bi, blk in enumerate(blocks):
        last, nxt = blk[-1], []
        t = last.branch_target()
        if t is not None and t > last.addr and t in index:
            nxt.append(index[t])  # forward branch inside the loop (inner back edges: counted once)
        falls = not (last.base == "EXIT" and last.unconditional) and not (t is not None and last.unconditional)
        if falls and bi + 1 < len(blocks):
            nxt.append(bi + 1)
        succ.append(nxt)
    # longest / shortest path from block 0 to the last block (the back edge), blocks in address order = a DAG
    n = len(blocks)
    best: list[tuple[int, int] | None] = [None] * n  # (max, min) instruction count to reach the end
    best[n - 1] = (len(blocks[-1]), len(blocks[-1]))
    choice: list[int | None] = [None] * n
    for bi in range(n - 2, -1, -1):
        opts = [(best[s], s) for s in succ[bi] if best[s] is not None]
        if not opts:
            continue
        (mx, _), s_max = max(opts, key=lambda o: o[0][0])
        mn = min(o[0][1] for o in opts)
        best[bi] = (mx + len(blocks[bi]), mn + len(blocks[bi]))
        choice[bi] = s_max
    if best[0] is None:
        raise ValueError("the hot loop's head does not reach its back edge")
    path, bi = [], 0
    while bi is not None:
        path.extend(blocks[bi])
        bi = choice[bi] if bi != n - 1 else None
    ops = Counter(ins.base for ins in path)
    cls = Counter(classify(ins.op) for ins in path)
    return LoopReport(head=body[0].addr, tail=body[-1].addr, body_instructions=len(body), executed=best[0][0],
                      executed_min=best[0][1], tensor_ops=cls["tensor"],
                      by_class={c: cls.get(c, 0) for c in CLASS_NAMES}, by_opcode=dict(ops.most_common()))
