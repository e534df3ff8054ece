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


# ------------------------------------------------------------------ whole functions: line info and control flow
#
# The hot loop above is one loop; a whole-kernel count needs every basic block a warp executes. nvdisasm
# (-gi) prints the same SASS as cuobjdump with, for a cubin built with -lineinfo, the source line of every
# instruction and the chain of inlined calls it came through: the last frame of the chain is the line of the
# kernel function's own body, which tells which part of the kernel an instruction belongs to. -lineinfo
# changes no instruction (tests/test_kernel_static.py compares the two builds).

_NV_LINE = re.compile(r'//## File "([^"]+)", line (\d+)( inlined at)?')
_NV_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_NV_SECTION = re.compile(r"^\.text\.(\S+):\s*$")
_NV_LABEL = re.compile(r"^\s*([.$][\w$.]*):\s*$")
_NV_TARGET = re.compile(r"`\(([^)]+)\)")


@dataclasses.dataclass
class LineInstr(Instr):
    """An instruction from nvdisasm: branch / call targets resolved from labels, and its source line."""
    labels: tuple[str, ...] = ()
    line: tuple[str, int] | None = None  # (file, line) of the outermost frame: the kernel's own body
    frames: tuple[tuple[str, int], ...] = ()  # innermost first
    target: int | None = None  # BRA / CALL target address
    target_label: str | None = None

    @property
    def is_jump(self) -> bool:
        """A BRA, or a CALL to a label of the function itself (ptxas leaves some loops by a predicated
        CALL.REL.NOINC to the loop's exit); a CALL to a subroutine ($...) returns."""
        return self.base == "BRA" or (self.base == "CALL" and self.target_label is not None
                                      and not self.target_label.startswith("$"))

    def branch_target(self) -> int | None:
        return self.target if self.is_jump else None


def nvdisasm_functions(cubin: Path) -> dict[str, list[LineInstr]]:
    """Mangled function name -> instructions with line info, from ``nvdisasm -gi``."""
    out = subprocess.run([tool("nvdisasm"), "-gi", "-c", str(cubin)], capture_output=True, text=True,
                         check=True).stdout
    return parse_nvdisasm(out)


def parse_nvdisasm(out: str) -> dict[str, list[LineInstr]]:
    """``nvdisasm -gi`` text -> {mangled function name: instructions}. Subroutines the compiler placed in a
    kernel's section (the 64-bit division helpers) stay in that kernel's list, after its code."""
    funcs: dict[str, list[LineInstr]] = {}
    cur: list[LineInstr] | None = None
    labels: list[str] = []
    pending: list[tuple[str, int]] = []
    frames: tuple[tuple[str, int], ...] = ()
    for raw in out.splitlines():
        s = raw.strip()
        m = _NV_SECTION.match(s)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            labels, pending, frames = [], [], ()
            continue
        if cur is None:
            continue
        m = _NV_LINE.search(s)
        if m:
            pending.append((m.group(1), int(m.group(2))))
            if not m.group(3):  # the outermost frame closes the chain
                frames, pending = tuple(pending), []
            continue
        m = _NV_LABEL.match(s)
        if m:
            labels.append(m.group(1))
            continue
        m = _NV_INSTR.search(s)
        if m:
            t = _NV_TARGET.search(m.group(4))
            cur.append(LineInstr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip(),
                                 labels=tuple(labels), line=frames[-1] if frames else None, frames=frames,
                                 target_label=None if t is None else t.group(1)))
            labels = []
    for instrs in funcs.values():
        where = {lab: ins.addr for ins in instrs for lab in ins.labels}
        for ins in instrs:
            if ins.target_label is not None:
                ins.target = where.get(ins.target_label)
    return funcs


@dataclasses.dataclass
class Block:
    index: int
    instrs: list[Instr]
    succ: list[int]  # successors on a converged warp's path (see Cfg)

    @property
    def addr(self) -> int:
        return self.instrs[0].addr

    @property
    def size(self) -> int:
        return len(self.instrs)

    def count(self, *prefixes: str) -> int:
        """Instructions whose opcode starts with one of `prefixes` (e.g. "STG", "ATOMG.E.ADD")."""
        return sum(any(ins.op.startswith(p) for p in prefixes) for ins in self.instrs)

    def lines(self) -> Counter:
        return Counter(ins.line[1] for ins in self.instrs if ins.line)


class Cfg:
    """Basic blocks of one function and the edges a converged warp can take:

    * a block ends at a label (a branch target) and after BRA / EXIT / CALL / RET;
    * BRA.DIV (taken only when the warp has diverged) is not taken, BRA.CONV (taken when it has not) is;
    * a CALL to a label of the function is a jump (LineInstr.is_jump), a CALL to a subroutine returns;
    * a predicated EXIT falls through (the warps that go on);
    * ``avoid(block)`` removes blocks from every path (kernel_static: the 64-bit division's slow-path CALL,
      which the modelled shapes never take: their operands fit in 32 bits).
    Blocks a warp cannot reach from the entry under these rules (the division subroutines, divergence
    handlers) are left out. A predicated instruction counts as executed either way (it takes its issue slot).
    """

    def __init__(self, instrs: list[Instr], avoid=None):
        leaders = {0}
        by_addr = {ins.addr: i for i, ins in enumerate(instrs)}
        for i, ins in enumerate(instrs):
            if getattr(ins, "labels", ()):
                leaders.add(i)
            if ins.branch_target() in by_addr:
                leaders.add(by_addr[ins.branch_target()])
            if ins.base in ("BRA", "EXIT", "CALL", "RET", "BRX", "JMP", "JMX") and i + 1 < len(instrs):
                leaders.add(i + 1)
        starts = sorted(leaders)
        blocks = [instrs[s : (starts[j + 1] if j + 1 < len(starts) else len(instrs))] for j, s in enumerate(starts)]
        index = {blk[0].addr: j for j, blk in enumerate(blocks)}
        all_blocks = []
        for j, blk in enumerate(blocks):
            last, succ = blk[-1], []
            if last.base in ("BRX", "JMX"):
                raise ValueError(f"indirect branch at {last.addr:#x}: not modelled")
            t = last.branch_target()
            if t is not None and last.op != "BRA.DIV":
                if t not in index:
                    raise ValueError(f"branch at {last.addr:#x} to {t:#x}: not a block start")
                succ.append(index[t])
            jump = t is not None and (last.op == "BRA.CONV" or (last.unconditional and last.op != "BRA.DIV"))
            ends = (last.base in ("EXIT", "RET") and last.unconditional) or jump
            if not ends and j + 1 < len(blocks):
                succ.append(j + 1)
            all_blocks.append(Block(j, blk, succ))
        avoided = {b.index for b in all_blocks if avoid is not None and avoid(b)}
        for b in all_blocks:
            b.succ = [s for s in b.succ if s not in avoided]
        seen, todo = set(), [0]
        while todo:
            j = todo.pop()
            if j in seen or j in avoided:
                continue
            seen.add(j)
            todo.extend(all_blocks[j].succ)
        self.blocks = all_blocks
        self.reachable = seen
        self.pred: dict[int, list[int]] = {j: [] for j in seen}
        for j in seen:
            for s in all_blocks[j].succ:
                if s in seen:
                    self.pred[s].append(j)

    def loops(self) -> list[tuple[int, int, frozenset[int]]]:
        """Natural loops: (head, latch, body) for every back edge latch -> head (head at or before latch)."""
        out = []
        for j in sorted(self.reachable):
            for h in self.blocks[j].succ:
                if h <= j and h in self.reachable:
                    body, todo = {h}, [j]
                    while todo:
                        x = todo.pop()
                        if x not in body:
                            body.add(x)
                            todo.extend(self.pred[x])
                    out.append((h, j, frozenset(body)))
        return out

    def path(self, src: int, dst: int, weight=None, allowed=None, longest: bool = True,
             via: int | None = None) -> tuple[int, list[int]] | None:
        """The longest (or shortest) path src -> dst on forward edges (back edges dropped: a loop's body
        counts once), summing ``weight(block)`` (default: its instruction count) over both ends and every
        block between; only blocks in ``allowed`` (default: all reachable); through ``via`` if given.
        Returns (total, blocks) or None when dst cannot be reached."""
        if via is not None:
            a = self.path(src, via, weight, allowed, longest)
            b = self.path(via, dst, weight, allowed, longest)
            if a is None or b is None:
                return None
            w = (weight or (lambda blk: blk.size))(self.blocks[via])
            return a[0] + b[0] - w, a[1] + b[1][1:]
        weight = weight or (lambda blk: blk.size)
        ok = set(self.reachable if allowed is None else set(allowed) & self.reachable)
        if src not in ok or dst not in ok:
            return None
        best: dict[int, tuple[int, int | None]] = {dst: (weight(self.blocks[dst]), None)}
        pick = max if longest else min
        for j in sorted((x for x in ok if src <= x < dst), reverse=True):
            opts = [(best[s][0], s) for s in self.blocks[j].succ if s > j and s in best]
            if opts:
                v, s = pick(opts)
                best[j] = (v + weight(self.blocks[j]), s)
        if src not in best:
            return None
        out, j = [], src
        while j is not None:
            out.append(j)
            j = best[j][1]
        return best[src][0], out
