"""Instructions per block of the row-group tiles, read from the compiled assembly (Numba's
`inspect_asm`), for every target this CPU (or emulated CPU model) can compile: the size of the
tile's block loop, per block and per (row, token) product of a block, for a one-token tile
(decode) and the widest tile (prompts).

    python tools/kernel_asm.py [--formats q4_0,q8_0,q8_0-int8x] [--tokens 1,4] [--json out.json] [--dump DIR]

"q8_0-int8x" is q8_0's tile for x rounded to int8 (`repack.Q8_0_INT8_X`: `vpdpbusd` on VNNI).

--dump writes each tile's whole assembly (comments dropped) to DIR/<target>-<format>-<tokens>.s:
diffing two trees' dumps shows whether a change altered the code a CPU runs.

The tiles are compiled, never run, so another CPU model's code can be counted on this one:
NUMBA_CPU_NAME=alderlake NUMBA_CPU_FEATURES=+avx,+avx2,+fma,+f16c,+avxvnni,+bmi2 (that CPU's
defaults plus the names santacpu's target choice reads) counts an Alder Lake's tiles on any x86
machine (tests/test_repack.py compiles the VNNI tiles so on every CI run).

Runs on x86 and on ARM64 (tools/arm64_check.sh runs it under emulation with --asm), where time
means nothing but instruction counts still compare the instruction sets side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from arm64_probe import inner_loop  # noqa: E402
from numba import njit, typeof  # noqa: E402

from santacpu.backends.cpu import repack  # noqa: E402
from santacpu.backends.cpu.isa import VNNI256, VNNI512  # noqa: E402
from santacpu.backends.cpu.target import runnable_targets  # noqa: E402

# Each block of a tile ends in one fused multiply-add a token (q4_m: two, its minimums): how the
# block loop is found in the assembly, and how many blocks one turn of it does (LLVM unrolls).
FMA = r"(?:vfmadd\w*ps|fmla\s+v\d+\.4s)"  # packed only: not the scalar remainder loops
VNNI = (VNNI256, VNNI512)
STACK = re.compile(r"\((?:%rsp|%rbp|sp)\b|\[sp\b")  # x86 and ARM64 stack addresses


def tile_kernel(fmt: int, isa: int, n_tokens: int):
    @njit
    def tile(parts, xq, xfix, xdx, bias, out):
        repack._group_tile(parts, xq, xfix, xdx, bias, 0, 0, out, n_tokens, fmt, isa)

    return tile


def part_types(qtype: str) -> tuple[np.ndarray, ...]:
    """Arrays of a row-group weight's parts' types (repack.RowGroupWeight), without making one:
    interleaving runs kernels, which a CPU model this CPU lacks would not run."""
    codes = np.zeros((1, 1), np.int8 if qtype == "q8_0" else np.uint8)
    if qtype == "q4_m":  # scale and minimum codes per block, d and dmin per row
        return codes, np.zeros((1, 1), np.uint8), np.zeros((1, 1), np.uint8), np.zeros(1, np.float32), np.zeros(1, np.float32)
    return codes, np.zeros((1, 1), np.uint16)  # fp16 scales' bits


def block_loop(target, kernel_name: str, n_tokens: int) -> tuple[float, list[str]]:
    """(instructions a block, loop lines, whole assembly) of the block loop of `target`'s tile
    `kernel_name` (a key of repack.KERNEL_IDS) for n tokens."""
    n, cols = target.rows_per_group, 64
    fmt, qtype = repack.KERNEL_IDS[kernel_name], kernel_name.split("-")[0]
    xq = np.zeros((n_tokens, cols), np.int16 if repack.takes_int16_x(fmt, target.isa) else np.int8)
    xfix, xdx = np.zeros((n_tokens, cols // 32), np.int32), np.zeros((n_tokens, cols // 32), np.float32)
    out = np.zeros((n_tokens, n), np.float32)
    kernel = tile_kernel(fmt, target.isa, n_tokens)
    # Compiled, not run: a CPU model's instructions can be counted where this CPU lacks them.
    kernel.compile(tuple(typeof(a) for a in (part_types(qtype), xq, xfix, xdx, np.zeros(n, np.float32), out)))
    asm = kernel.inspect_asm(kernel.signatures[0])
    body, count = inner_loop(asm, FMA)
    if body is None:
        raise SystemExit(f"{target.name} {qtype}: no block loop found in the assembly")
    fmas = sum(1 for line in body if re.search(rf"\b{FMA}\b", line))
    blocks = fmas / (n_tokens * (2 if qtype == "q4_m" else 1))
    return count / blocks, body, asm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(repack.KERNEL_IDS), help="formats, comma-separated (default: all, "
                        "and q8_0-int8x)")
    parser.add_argument("--tokens", help="token tiles, comma-separated, each 1, 2, 4 or 8 up to the target's widest "
                        "(default: 1 and the widest)")
    parser.add_argument("--json", help="also write the counts to this file")
    parser.add_argument("--dump", help="write each tile's assembly into this folder")
    args = parser.parse_args()
    rows = []
    for target in runnable_targets():
        for qtype in args.formats.split(","):
            widest = target.widest_tile(qtype.split("-")[0])
            wanted = {int(k) for k in args.tokens.split(",")} if args.tokens else {1, widest}
            for n_tokens in sorted(k for k in wanted if k <= widest):
                count, body, asm = block_loop(target, qtype, n_tokens)
                stack = sum(1 for line in body if STACK.search(line))  # spilled registers, mostly
                if args.dump:
                    os.makedirs(args.dump, exist_ok=True)
                    lines = [line.split("#")[0].rstrip() for line in asm.splitlines() if not line.strip().startswith(".")]
                    with open(os.path.join(args.dump, f"{target.name}-{qtype}-{n_tokens}.s"), "w") as file:
                        file.write("\n".join(lines) + "\n")
                per_product = count / (target.rows_per_group * n_tokens)
                rows.append({"target": target.name, "format": qtype, "tokens": n_tokens, "rows": target.rows_per_group,
                             "per_block": round(count, 1), "per_row_token": round(per_product, 2), "stack_accesses": stack})
                # Numba compiles every target for this CPU's features, and LLVM folds AVX2's
                # multiply-and-add pairs into VNNI instructions where the CPU has them.
                folded = target.isa not in VNNI and re.search(r"\bvpdp", asm) is not None
                print(f"{target.name:13} {qtype:10} {target.rows_per_group:2} rows x {n_tokens} tokens: "
                      f"{count:5.1f} instructions a block, {per_product:5.2f} a (row, token), {stack:3} on the stack"
                      + (f" (LLVM used this CPU's VNNI instructions: not {target.name}'s own code; count it "
                         "with NUMBA_CPU_NAME=haswell, or those features turned off: -avxvnni,-avx512vnni)" if folded else ""), flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=1)


if __name__ == "__main__":
    main()
