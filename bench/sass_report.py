"""What an sm_90a build of every kernel the dispatch launches looks like, on a machine without a GPU.

    python bench/sass_report.py [--shapes 28672x8192,...] [--ms 1,2,...] [--json FILE] [--quick]

Each op is called on meta tensors with the kernel launches recorded instead of run, so the configs
are exactly those the dispatch rule in qlora/kernels would launch for that (M, N, K) on a 132-SM
H100. Each distinct launch is compiled with Triton for sm_90a (GPUTarget cuda 90) with the same
argument specialisation a launch would give (16-byte aligned pointers, integers divisible by 16),
and read back with Triton's own cuobjdump and nvdisasm:

- regs, spills (local memory bytes), shared memory, CTAs per SM (by registers, shared memory, threads)
  and waves on 132 SMs;
- SASS per weight element: instructions of the main (innermost hot) loop per thread, times the
  threads, over the weight elements one iteration of a CTA decodes. Kernels without a loop (one tile
  per program) count the whole body;
- widths of the global loads and stores in that loop, and the MMA kind (HGMMA = wgmma, HMMA = mma.sync);
- modelled time: an issue-rate model (4 warp-instructions per clock per SM at 1.755 GHz) against the
  memory floor (3.02 TB/s, REFERENCE section 7's copy ceiling) or the tensor-core floor (687 TFLOP/s
  bf16, same section), whichever is larger. A model, not a measurement: no GPU ran anything here.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before qlora: the kernels must be JIT functions, not interpreted
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, said aloud (no warning)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora.kernels import adamw as A  # noqa: E402
from qlora.kernels import backend  # noqa: E402
from qlora.kernels import dequantize as D  # noqa: E402
from qlora.kernels import gemv as G  # noqa: E402
from qlora.kernels import matmul as MM  # noqa: E402
from qlora.kernels import quantize as Q  # noqa: E402

SHAPES = [(28672, 8192), (11008, 4096), (4096, 4096)]  # [out, in]
MS = [1, 2, 4, 8, 16, 64, 65, 128, 512, 4096]
SM_COUNT, CLOCK_HZ, ISSUE_PER_CLOCK = 132, 1.755e9, 4
MEM_BYTES_PER_S, MMA_FLOP_PER_S = 3.02e12, 687e12
REGS_PER_SM, SMEM_PER_SM, THREADS_PER_SM, MAX_CTAS = 65536, 228 * 1024, 2048, 32
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
TARGET = GPUTarget("cuda", 90, 32)
_TL_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8",
             torch.int64: "i64", torch.int32: "i32"}


def tools_available() -> bool:
    return (BIN / "cuobjdump").exists() and (BIN / "nvdisasm").exists()


@dataclass
class Launch:
    """One recorded kernel launch: what triton.compile needs, and the grid."""
    kernel: object
    args: tuple
    constexprs: dict
    grid: tuple
    num_warps: int = 4
    num_stages: int = 3

    def key(self):
        args = tuple(("ptr", a.dtype) if isinstance(a, torch.Tensor) else ("int", specialisation(a))
                     for a in self.args)
        return (self.kernel.fn.__name__, args, tuple(sorted(self.constexprs.items())), self.num_warps,
                self.num_stages)


def specialisation(value: int) -> str:
    # What a launch specialises an integer on: 1 becomes a constant, multiples of 16 get the hint.
    if value == 1:
        return "one"
    return ("i32" if -2**31 <= value < 2**31 else "i64") + (":16" if value % 16 == 0 else "")


class _Recorder:
    """Stands in for a JIT kernel: `kernel[grid](...)` records the launch."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, **constexprs):
            constexprs["ON_GPU"] = True if "ON_GPU" in self.kernel.arg_names else None
            constexprs = {k: v for k, v in constexprs.items() if v is not None}
            self.launches.append(Launch(self.kernel, args, constexprs, tuple(grid), num_warps, num_stages))
        return launch


@contextmanager
def recording():
    """Kernel launches in qlora.kernels are recorded (not run); split-K planned for SM_COUNT SMs."""
    launches: list[Launch] = []
    names = [(mod, name) for mod in (D, G, MM, Q, A) for name in dir(mod)
             if isinstance(getattr(mod, name), triton.runtime.jit.JITFunction) and name.endswith("_kernel")]
    saved = [(mod, name, getattr(mod, name)) for mod, name in names]
    saved_sm = backend.sm_count
    try:
        for mod, name, kernel in saved:
            setattr(mod, name, _Recorder(kernel, launches))
        backend.sm_count = lambda device: SM_COUNT
        yield launches
    finally:
        for mod, name, kernel in saved:
            setattr(mod, name, kernel)
        backend.sm_count = saved_sm


def compile_launch(launch: Launch):
    """The sm_90a build of a recorded launch."""
    fn = launch.kernel
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    values = list(launch.args)
    params = [n for n in fn.arg_names if n not in launch.constexprs]
    for index, name in enumerate(fn.arg_names):
        if name in launch.constexprs:
            signature[name] = "constexpr"
            continue
        value = values[params.index(name)]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TL_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            spec = specialisation(int(value))
            if spec == "one":
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = spec.split(":")[0]
            if spec.endswith(":16"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=TARGET, options=dict(num_warps=launch.num_warps,
                                                              num_stages=launch.num_stages))


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?`?\(?(\.L_x_\d+)\)?")


def disassemble(cubin: bytes) -> tuple[str, str]:
    """(nvdisasm listing, cuobjdump resource usage) of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([str(BIN / "nvdisasm"), "-c", str(path)], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                               check=True).stdout
    return sass, usage


# Kernels whose source has a K loop; the others handle one tile per program (their few backward
# branches are slow paths, e.g. of the IEEE division), so their whole body is counted.
LOOP_KERNELS = ("_dequantize_kernel", "_quantize_kernel", "_nf4_gemv_kernel", "_nf4_linear_kernel", "_nf4_linear_grad_input_kernel")


def parse_sass(sass: str, has_loop: bool = True) -> tuple[list[str], list[str]]:
    """(all instructions, the main loop's instructions). The main loop is the backward branch's
    body holding the most MMA instructions, then the most instructions; the whole body if no loop."""
    instrs, labels = [], {}
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instrs)
        found = _INSTR.search(line)
        if found:
            instrs.append(found.group(2))
    loops = []
    for at, text in enumerate(instrs):
        branch = _BRANCH.search(text)
        if branch and labels.get(branch.group(1), at + 1) <= at:
            loops.append(instrs[labels[branch.group(1)]:at + 1])
    if not loops or not has_loop:
        return instrs, [i for i in instrs if not i.startswith(("EXIT", "BRA", "NOP"))]
    body = max(loops, key=lambda body: (sum("MMA" in i for i in body), len(body)))
    return instrs, body


def access_widths(body: list[str], op: str) -> str:
    """Distinct widths (bits) of the global loads (LDG) or stores (STG) in body, e.g. '8,128'."""
    widths = set()
    for instr in body:
        found = re.search(rf"\b{op}(?:STS)?\.E(\S*)", instr)  # LDGSTS: cp.async of a pipelined load
        if found:
            suffix = found.group(1)
            width = next((int(w) for w in re.findall(r"\.(\d+)", suffix) if w in ("64", "128")), None)
            width = width or (16 if ".U16" in suffix or ".S16" in suffix else
                              8 if ".U8" in suffix or ".S8" in suffix else 32)
            widths.add(width)
    return ",".join(str(w) for w in sorted(widths)) or "-"


def mma_kind(instrs: list[str]) -> str:
    if any(i.split()[-1].startswith("HGMMA") or "HGMMA" in i for i in instrs):
        return "wgmma (HGMMA)"
    if any("HMMA" in i for i in instrs):
        return "mma.sync (HMMA)"
    return "none (CUDA cores)"


def weight_elements_per_iteration(launch: Launch) -> int:
    """Weight (or tensor) elements one main-loop iteration of one CTA handles."""
    c = launch.constexprs
    name = launch.kernel.fn.__name__
    if name in ("_dequantize_kernel", "_quantize_kernel"):
        return c["BLOCKS_PER_TILE"] * c["BLOCKSIZE"]
    if name == "_nf4_gemv_kernel":
        return c["BLOCK_N"] * c["BLOCKS_K"] * c["BLOCKSIZE"]
    if name in ("_nf4_linear_kernel", "_nf4_linear_grad_input_kernel"):
        return c["BLOCK_N"] * c["BLOCK_K"]
    return c.get("BLOCK", c.get("NESTED_BLOCKSIZE", 1))


def resources(usage: str) -> dict:
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {k: int(v) for k, v in fields.items()}


@dataclass
class Row:
    config: str
    kernel: str
    regs: int
    spills: int
    shared: int
    ctas_per_sm: int
    waves: float
    sass_per_element: float
    loads: str
    stores: str
    mma: str
    shuffles: int
    modelled_us: float
    floor_us: float
    bound: str
    notes: dict = field(default_factory=dict)


def binary_facts(launch: Launch) -> dict:
    """What the sm_90a binary of a launch shows, independent of its grid."""
    compiled = compile_launch(launch)
    sass, usage = disassemble(compiled.asm["cubin"])
    res = resources(usage)
    instrs, body = parse_sass(sass, launch.kernel.fn.__name__ in LOOP_KERNELS)
    threads = launch.num_warps * 32
    shared = max(res.get("SHARED", 0), compiled.metadata.shared)
    ctas = min(REGS_PER_SM // max(1, res.get("REG", 1) * threads), THREADS_PER_SM // threads, MAX_CTAS,
               SMEM_PER_SM // shared if shared else MAX_CTAS)
    return dict(kernel=launch.kernel.fn.__name__, regs=res.get("REG", 0),
                spills=res.get("LOCAL", 0) + res.get("STACK", 0), shared=shared, ctas_per_sm=ctas,
                sass_per_element=round(len(body) * threads / weight_elements_per_iteration(launch), 2),
                loads=access_widths(body, "LDG"), stores=access_widths(body, "STG"), mma=mma_kind(instrs),
                shuffles=sum("SHFL" in i for i in body))


def make_row(config: str, facts: dict, launch: Launch, work: dict) -> Row:
    """A table row: the binary's facts with this launch's grid, and the issue-rate model of its time.

    Every weight element costs sass_per_element thread-instructions (/32 per warp), issued 4 warp-
    instructions per clock per SM; a partial last wave costs a whole one."""
    grid = 1
    for g in launch.grid:
        grid *= g
    waves = grid / (SM_COUNT * max(facts["ctas_per_sm"], 1))
    c = launch.constexprs
    # Tensor-core tiles decode their W tile once per BLOCK_M rows of x.
    elements = work["elements"] * (-(-work.get("M", 1) // c["BLOCK_M"]) if "BLOCK_M" in c else 1)
    issue_s = elements * facts["sass_per_element"] / 32 / (ISSUE_PER_CLOCK * SM_COUNT * CLOCK_HZ)
    issue_s *= (-(-waves // 1) / waves) if waves >= 1 else 1.0 / waves
    mem_s, mma_s = work["bytes"] / MEM_BYTES_PER_S, work.get("flops", 0) / MMA_FLOP_PER_S
    floor_s = max(mem_s, mma_s)
    uses_mma = facts["mma"] != "none (CUDA cores)"
    decode_s = issue_s
    # Each CTA waits for its k-step's MMAs before decoding the next tile. With one CTA per SM the
    # decode's issue time adds to the tensor cores' time; with two or more (independent warpgroups),
    # one decodes while another's wgmma runs, and the larger of the two bounds the SM.
    overlapped = uses_mma and facts["ctas_per_sm"] >= 2
    if uses_mma:
        issue_s = max(issue_s, mma_s) if overlapped else issue_s + mma_s
    notes = dict(decode_over_mma=round(decode_s / mma_s, 2) if uses_mma else None,
                 overlap=(f"{facts['ctas_per_sm']} CTAs" if overlapped else "none") if uses_mma else None,
                 grid=list(launch.grid), tile="x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in c),
                 split_k=c.get("SPLIT_K", c.get("SPLIT_N", 1)), num_warps=launch.num_warps, num_stages=launch.num_stages)
    return Row(config=config, waves=round(waves, 2), modelled_us=round(max(issue_s, floor_s) * 1e6, 1),
               floor_us=round(floor_s * 1e6, 1), bound="memory" if mem_s >= mma_s else "tensor cores",
               notes=notes, **facts)


def _meta_weight(N: int, K: int, blocksize: int = 64):
    n_blocks = N * K // blocksize
    meta = dict(device="meta")
    return (torch.empty(N * K // 2, 1, dtype=torch.uint8, **meta), torch.empty(n_blocks, dtype=torch.uint8, **meta),
            torch.empty(16, **meta), N, K, blocksize, torch.empty(-(-n_blocks // 256), **meta),
            torch.empty(256, **meta), torch.empty((), **meta))


def configs(shapes, ms, blocksize: int = 64):
    """(config name, op to call on meta tensors, work: elements, bytes and flops of the op)."""
    for N, K in shapes:
        w = _meta_weight(N, K, blocksize)
        nf4_bytes = N * K // 2 + N * K // blocksize
        yield (f"dequantise {N}x{K}", lambda w=w: D.dequantize_nf4_triton(*w[:3], w[3] * w[4], w[5],
                                                                           torch.bfloat16, *w[6:]),
               dict(elements=N * K, bytes=nf4_bytes + 2 * N * K))
        yield (f"quantise {N}x{K}", lambda N=N, K=K: Q.quantize_nf4_blocks_triton(
            torch.empty(N, K, dtype=torch.bfloat16, device="meta"), blocksize),
               dict(elements=N * K, bytes=2 * N * K + nf4_bytes))
        for M in ms:
            x = torch.empty(M, K, dtype=torch.bfloat16, device="meta")
            g = torch.empty(M, N, dtype=torch.bfloat16, device="meta")
            work = dict(elements=N * K, M=M, bytes=nf4_bytes + 2 * M * (N + K), flops=2 * M * N * K)
            yield f"forward {N}x{K} M={M}", lambda x=x, w=w: MM.nf4_linear_triton(x, *w), work
            if M >= 16:
                yield f"input grad {N}x{K} M={M}", lambda g=g, w=w: MM.nf4_linear_grad_input_triton(g, *w), work
    n = 4096 * 4096
    yield ("AdamW 4096x4096 bf16", lambda: A.fused_adamw_(
        [torch.empty(4096, 4096, dtype=torch.bfloat16, device="meta")],
        [torch.empty(4096, 4096, dtype=torch.bfloat16, device="meta")],
        [torch.empty(4096, 4096, device="meta")], [torch.empty(4096, 4096, device="meta")],
        # CPU scalars: fused_adamw_ reads its per-tensor flags on the host (zeros: plain AdamW).
        torch.zeros(1, getattr(A, "SCALAR_COLUMNS", 8))), dict(elements=n, bytes=n * (2 + 2 + 2 + 4 * 4)))


def report(shapes=SHAPES, ms=MS, only: str = "", blocksize: int = 64) -> list[Row]:
    rows, facts = [], {}
    for config, op, work in configs(shapes, ms, blocksize):
        if not any(part in config for part in only.split(",")):
            continue
        try:
            with recording() as launches:
                op()
        except Exception as err:  # one op's host code changed: say so, keep the other rows
            print(f"{config}: not recorded ({type(err).__name__}: {err})", file=sys.stderr)
            continue
        for launch in launches:
            key = launch.key()
            if key not in facts:  # one build per distinct binary
                facts[key] = binary_facts(launch)
            rows.append(make_row(config, facts[key], launch, work))
    return rows


def _decode_cell(notes: dict) -> str:
    if notes.get("decode_over_mma") is None:
        return "-"
    return f"{notes['decode_over_mma']} ({notes['overlap']})"


def markdown(rows: list[Row]) -> str:
    head = ("| config | kernel (tile, split-K) | regs | spills | smem B | CTAs/SM | waves | SASS/elem | LDG bits "
            "| STG bits | MMA | decode / MMA time (overlap) | model us | floor us (bound) |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        extra = f" ({r.notes.get('tile') or '-'}, {r.notes.get('split_k', 1)})" if r.notes.get("tile") else ""
        lines.append(f"| {r.config} | {r.kernel}{extra} | {r.regs} | {r.spills} | {r.shared} | {r.ctas_per_sm} | "
                     f"{r.waves} | {r.sass_per_element} | {r.loads} | {r.stores} | {r.mma} | "
                     f"{_decode_cell(r.notes)} | {r.modelled_us} | "
                     f"{r.floor_us} ({r.bound}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--only", default="", help="only the configs whose name contains one of these "
                                                    "(comma-separated)")
    parser.add_argument("--blocksize", type=int, default=64, help="quantisation blocksize of the weights")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    if not tools_available():
        print(f"bench/sass_report.py: Triton's nvdisasm/cuobjdump not found under {BIN}", file=sys.stderr)
        return 1
    shapes = [tuple(int(s) for s in shape.split("x")) for shape in args.shapes.split(",")]
    rows = report(shapes, [int(m) for m in args.ms.split(",") if m], args.only, args.blocksize)
    print(markdown(rows))
    if args.json:
        tmp = args.json.with_name(args.json.name + ".partial")
        tmp.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
