"""Instructions per block of the row-group tiles, read from the compiled assembly (Numba's
`inspect_asm`), for every target this CPU (or emulated CPU model) can compile: the size of the
tile's block loop, per block and per (row, token) product of a block, for a one-token tile
(decode) and the widest tile (prompts).

    python tools/kernel_asm.py [--formats q4_0,q8_0] [--tokens 1,4] [--json out.json] [--dump DIR]

--dump writes each tile's whole assembly (comments dropped) to DIR/<target>-<format>-<tokens>.s:
diffing two trees' dumps shows whether a change altered the code a CPU runs.

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
from numba import njit  # noqa: E402

from santacpu.backends.cpu import repack  # noqa: E402
from santacpu.backends.cpu.target import runnable_targets  # noqa: E402
from santacpu.formats.blocks import FORMATS, QuantizedWeight  # noqa: E402

# Each block of a tile ends in one fused multiply-add a token (q4_m: two, its minimums): how the
# block loop is found in the assembly, and how many blocks one turn of it does (LLVM unrolls).
FMA = r"(?:vfmadd\w*ps|fmla\s+v\d+\.4s)"  # packed only: not the scalar remainder loops


def tile_kernel(fmt: int, isa: int, n_tokens: int):
    @njit
    def tile(parts, xq, xfix, xdx, bias, out):
        repack._group_tile(parts, xq, xfix, xdx, bias, 0, 0, out, n_tokens, fmt, isa)

    return tile


def block_loop(target, qtype: str, n_tokens: int) -> tuple[float, list[str]]:
    """(instructions a block, loop lines, whole assembly) of the block loop of `target`'s tile for `qtype` and n tokens."""
    n, cols = target.rows_per_group, 64
    weight = QuantizedWeight(qtype, (n, cols), FORMATS[qtype].quantize(np.ones((n, cols), np.float32)))
    grouped = repack.group_rows(weight, n)
    xq = np.zeros((n_tokens, cols), np.int16 if qtype == "q8_0" else np.int8)
    xfix, xdx = np.zeros((n_tokens, cols // 32), np.int32), np.zeros((n_tokens, cols // 32), np.float32)
    out = np.zeros((n_tokens, n), np.float32)
    kernel = tile_kernel(FORMATS[qtype].format_id, target.isa, n_tokens)
    kernel(grouped.parts, xq, xfix, xdx, np.zeros(n, np.float32), out)
    asm = kernel.inspect_asm(kernel.signatures[0])
    body, count = inner_loop(asm, FMA)
    if body is None:
        raise SystemExit(f"{target.name} {qtype}: no block loop found in the assembly")
    fmas = sum(1 for line in body if re.search(rf"\b{FMA}\b", line))
    blocks = fmas / (n_tokens * (2 if qtype == "q4_m" else 1))
    return count / blocks, body, asm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(repack.FORMATS), help="formats, comma-separated (default: all)")
    parser.add_argument("--tokens", help="token tiles, comma-separated, each 1, 2, 4 or 8 up to the target's widest "
                        "(default: 1 and the widest)")
    parser.add_argument("--json", help="also write the counts to this file")
    parser.add_argument("--dump", help="write each tile's assembly into this folder")
    args = parser.parse_args()
    rows = []
    for target in runnable_targets():
        for qtype in args.formats.split(","):
            widest = target.widest_tile(qtype)
            wanted = {int(k) for k in args.tokens.split(",")} if args.tokens else {1, widest}
            for n_tokens in sorted(k for k in wanted if k <= widest):
                count, _, asm = block_loop(target, qtype, n_tokens)
                if args.dump:
                    os.makedirs(args.dump, exist_ok=True)
                    lines = [line.split("#")[0].rstrip() for line in asm.splitlines() if not line.strip().startswith(".")]
                    with open(os.path.join(args.dump, f"{target.name}-{qtype}-{n_tokens}.s"), "w") as file:
                        file.write("\n".join(lines) + "\n")
                per_product = count / (target.rows_per_group * n_tokens)
                rows.append({"target": target.name, "format": qtype, "tokens": n_tokens, "rows": target.rows_per_group,
                             "per_block": round(count, 1), "per_row_token": round(per_product, 2)})
                print(f"{target.name:13} {qtype:5} {target.rows_per_group:2} rows x {n_tokens} tokens: "
                      f"{count:5.1f} instructions a block, {per_product:5.2f} a (row, token)", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=1)


if __name__ == "__main__":
    main()
