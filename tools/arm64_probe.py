"""Feasibility probe for ARM64 NEON integer dot products (issue 27), run by tools/arm64_check.sh
under QEMU user-mode emulation for each `-cpu` model, or directly on a Linux ARM64 (or x86) machine:

    python3 tools/arm64_probe.py          # all probes, one report line each ("probe: key = value")
    python3 tools/arm64_probe.py --quick  # without the compiles that are expected to fail

It does not import santacpu (only numpy, numba, llvmlite), so it runs whatever state the kernels
are in. What it checks:
- the CPU's features as the kernels must detect them: getauxval(AT_HWCAP) bit 20 (HWCAP_ASIMDDP:
  sdot/udot) and getauxval(AT_HWCAP2) bit 13 (HWCAP2_I8MM: smmla/ummla). QEMU user mode emulates
  the auxiliary vector for its -cpu model but shows the host's /proc/cpuinfo, and LLVM's host
  detection on Linux/AArch64 reads /proc/cpuinfo, so under emulation only HWCAP is right;
- `import numba` and a first trivial compile, timed;
- what LLVM and Numba think the host CPU is (name, +dotprod/+i8mm);
- in child processes (a failed LLVM selection may abort the process), for a given target
  (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES): a Numba @intrinsic calling
  `llvm.aarch64.neon.sdot.v4i32.v16i8` (int8 dot product, 16 bytes a step; "sdot2": the same
  unrolled by hand, 32 bytes a step into two accumulators), one calling
  `llvm.aarch64.neon.smmla.v4i32.v16i8` (2 x 8 by 8 x 2 int8 tile product) and a plain int8 dot
  loop with int32 sums left to LLVM's vectoriser; each checked against NumPy, with its inner loop
  from `inspect_asm` and the loop's instruction count per 32 values;
- the same intrinsics compiled for a target without the feature (does LLVM abort or raise?), and
  compiled with it on a CPU without it (does the emulated CPU trap?).
Emulated time says nothing about real speed, so only instruction counts are reported.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import subprocess
import sys
import time

AT_HWCAP, AT_HWCAP2 = 16, 26
HWCAP_BITS = {"asimd": 1, "asimddp": 20, "sve": 22}  # Linux arch/arm64 uapi hwcap.h
HWCAP2_BITS = {"sve2": 1, "i8mm": 13, "bf16": 14}
N = 4096  # int8 values per dot product in the checks


def hwcaps() -> tuple[int, int]:
    """(AT_HWCAP, AT_HWCAP2) of this process, from the auxiliary vector."""
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    libc.getauxval.argtypes = [ctypes.c_ulong]
    return libc.getauxval(AT_HWCAP), libc.getauxval(AT_HWCAP2)


def arm64_features() -> set[str]:
    """The runtime detection the ARM64 kernels need: {'dotprod', 'i8mm'} or a subset (empty off Linux/AArch64)."""
    if platform.system() != "Linux" or platform.machine() != "aarch64":
        return set()
    hwcap, hwcap2 = hwcaps()
    found = set()
    if hwcap >> HWCAP_BITS["asimddp"] & 1:
        found.add("dotprod")
    if hwcap2 >> HWCAP2_BITS["i8mm"] & 1:
        found.add("i8mm")
    return found


def llvm_target(features: set[str]) -> dict[str, str]:
    """NUMBA_CPU_NAME / NUMBA_CPU_FEATURES that compile for exactly these features (set before importing numba)."""
    on = ["+neon"] + [f"+{f}" for f in sorted(features)]
    off = [f"-{f}" for f in ("dotprod", "i8mm") if f not in features]
    return {"NUMBA_CPU_NAME": "generic", "NUMBA_CPU_FEATURES": ",".join(on + off)}


def report(key, value):
    print(f"probe: {key} = {value}", flush=True)


# --- child: compile and run the kernels for the target in the environment --------------------------


def kernels():
    import numpy as np
    from llvmlite import ir
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    i8x16, i32x4 = ir.VectorType(ir.IntType(8), 16), ir.VectorType(ir.IntType(32), 4)
    intp = ir.IntType(64)

    def declare(builder, name, ret, *args):
        return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, list(args)), name)

    def load16(builder, array, offset):
        pointer = builder.bitcast(builder.gep(array.data, [offset]), i8x16.as_pointer())
        return builder.load(pointer, align=1)

    def sdot_summer(unroll):
        """An intrinsic: sum(a * b) of two int8 arrays (length a multiple of 16 x unroll) by sdot,
        `unroll` 16-byte steps a loop turn into as many accumulators of 4 int32 lanes."""

        @intrinsic
        def sdot_sum(typingctx, a, b):
            def codegen(context, builder, signature, args):
                va = context.make_array(signature.args[0])(context, builder, args[0])
                vb = context.make_array(signature.args[1])(context, builder, args[1])
                turn = 16 * unroll
                steps = builder.udiv(builder.extract_value(va.shape, 0), ir.Constant(intp, turn))
                sdot = declare(builder, "llvm.aarch64.neon.sdot.v4i32.v16i8", i32x4, i32x4, i8x16, i8x16)
                accs = [cgutils.alloca_once_value(builder, ir.Constant(i32x4, None)) for _ in range(unroll)]
                with cgutils.for_range(builder, steps) as loop:
                    for k, acc in enumerate(accs):
                        offset = builder.add(builder.mul(loop.index, ir.Constant(intp, turn)), ir.Constant(intp, 16 * k))
                        x, y = load16(builder, va, offset), load16(builder, vb, offset)
                        builder.store(builder.call(sdot, [builder.load(acc), x, y]), acc)
                total = builder.load(accs[0])
                for acc in accs[1:]:
                    total = builder.add(total, builder.load(acc))
                reduce = declare(builder, "llvm.vector.reduce.add.v4i32", ir.IntType(32), i32x4)
                return builder.call(reduce, [total])

            return types.int32(a, b), codegen

        return sdot_sum

    sdot_sum, sdot_sum2 = sdot_summer(1), sdot_summer(2)

    @intrinsic
    def smmla_tile(typingctx, a, b, out):
        """out[2 x 2] (int32, row-major) = A @ B.T for int8 A, B [2, K], each given as 16-byte steps
        of (row 0's 8 values, row 1's 8 values): one smmla per 8 values of K."""

        def codegen(context, builder, signature, args):
            va = context.make_array(signature.args[0])(context, builder, args[0])
            vb = context.make_array(signature.args[1])(context, builder, args[1])
            vo = context.make_array(signature.args[2])(context, builder, args[2])
            steps = builder.lshr(builder.extract_value(va.shape, 0), ir.Constant(intp, 4))
            smmla = declare(builder, "llvm.aarch64.neon.smmla.v4i32.v16i8", i32x4, i32x4, i8x16, i8x16)
            acc = cgutils.alloca_once_value(builder, ir.Constant(i32x4, None))
            with cgutils.for_range(builder, steps) as loop:
                offset = builder.shl(loop.index, ir.Constant(intp, 4))
                x, y = load16(builder, va, offset), load16(builder, vb, offset)
                builder.store(builder.call(smmla, [builder.load(acc), x, y]), acc)
            builder.store(builder.load(acc), builder.bitcast(vo.data, i32x4.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.none(a, b, out), codegen

    @njit
    def dot_sdot(a, b):
        return sdot_sum(a, b)

    @njit
    def dot_sdot2(a, b):
        return sdot_sum2(a, b)

    @njit
    def tile_smmla(a, b, out):
        smmla_tile(a, b, out)

    @njit
    def dot_loop(a, b):
        # Plain int8 x int8 -> int32 sums; the cast keeps the sum int32 (Numba's int32 * int32 is int64).
        s = np.int32(0)
        for i in range(a.size):
            s = np.int32(s + np.int32(a[i]) * np.int32(b[i]))
        return s

    return dot_sdot, dot_sdot2, tile_smmla, dot_loop


INSTRUCTION = re.compile(r"^\s+([a-z][a-z0-9.]*)\b")
LABEL = re.compile(r"^(\.?L?[\w.$]+):")
BRANCH = re.compile(r"^(b|b\.\w+|cbn?z|tbn?z|j[a-z]+)$")  # jumps (AArch64, x86), not calls (bl, blr)


def inner_loop(asm: str, marker: str):
    """The loop (label .. backward branch to it) with the most `marker` instructions (the main vector loop,
    not its remainder), the shortest of those: its lines and its instruction count."""
    lines = asm.splitlines()
    labels = {}
    best, best_key = None, None
    for i, line in enumerate(lines):
        m = LABEL.match(line)
        if m:
            labels[m.group(1)] = i
        m = INSTRUCTION.match(line)
        if not m or not BRANCH.match(m.group(1)):
            continue
        target = line.split()[-1]
        if target in labels and labels[target] < i:  # a backward branch closes a loop
            body = lines[labels[target] : i + 1]
            hits = sum(1 for b in body if re.search(rf"\b{marker}\b", b))
            if hits and (best is None or (hits, -len(body)) > best_key):
                best, best_key = body, (hits, -len(body))
    if best is None:
        return None, 0
    count = sum(1 for b in best if INSTRUCTION.match(b) and not b.strip().startswith("."))
    return best, count


def x86_values(body) -> int:
    """int8 values one x86 loop iteration multiplies (vpmaddwd on 16-bit lanes: 8 per xmm, 16 ymm, 32 zmm)."""
    per = {"xmm": 8, "ymm": 16, "zmm": 32}
    total = 0
    for line in body:
        m = re.search(r"\b(vpmaddwd|vpdpwssd)\b.*%([xyz]mm)\d+\s*$", line)
        if m:
            total += per[m.group(2)]
    return total


def child(kinds: list[str]) -> int:
    import numpy as np

    t = time.time()
    import numba  # noqa: F401
    from numba.core import config

    result = {"numba_import_s": round(time.time() - t, 1), "cpu_name": config.CPU_NAME, "cpu_features": config.CPU_FEATURES}
    dot_sdot, dot_sdot2, tile_smmla, dot_loop = kernels()
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, N, dtype=np.int8)
    b = rng.integers(-128, 128, N, dtype=np.int8)
    want = int(a.astype(np.int64) @ b.astype(np.int64))
    arm = platform.system() == "Linux" and platform.machine() == "aarch64"
    for kind in kinds:
        t = time.time()
        entry = {}
        if kind == "loop":
            got, fn, marker = int(dot_loop(a, b)), dot_loop, ("sdot" if arm else "vpmaddwd")
            entry["correct"] = got == want
        elif kind in ("sdot", "sdot2"):
            fn = dot_sdot if kind == "sdot" else dot_sdot2
            got, marker = int(fn(a, b)), "sdot"
            entry["correct"] = got == want
        else:  # smmla: A, B [2, K] in 16-byte steps (row 0's 8 values, row 1's 8 values)
            A, B = a.reshape(2, -1), b.reshape(2, -1)
            pack = lambda m: np.ascontiguousarray(m.reshape(2, -1, 8).transpose(1, 0, 2)).ravel()
            out = np.zeros(4, np.int32)
            tile_smmla(pack(A), pack(B), out)
            fn, marker = tile_smmla, "smmla"
            entry["correct"] = bool(np.array_equal(out.reshape(2, 2), A.astype(np.int64) @ B.astype(np.int64).T))
        entry["compile_and_run_s"] = round(time.time() - t, 1)
        asm = fn.inspect_asm(fn.signatures[0])
        body, count = inner_loop(asm, marker)
        if body is None and arm:  # no sdot: NEON widening multiplies (8 products each)
            marker = "sm(?:ull|lal)2?"
            body, count = inner_loop(asm, marker)
        if body is not None:
            entry["loop"] = [line.strip() for line in body]
            entry["loop_instructions"] = count
            entry["counted"] = {"sm(?:ull|lal)2?": "smull/smlal"}.get(marker, marker)
            ops = sum(1 for line in body if re.search(rf"\b{marker}\b", line))
            if kind == "smmla":  # each smmla: 8 values of K for a 2 x 2 tile (4 dot products)
                entry["per_32_values_of_2x2_tile"] = round(count * 32 / (8 * ops), 2)
                entry["per_32_values_per_row_token_pair"] = round(count * 32 / (8 * ops) / 4, 2)
            elif arm:  # each sdot: 16 values; each smull/smlal(2): 8
                entry["per_32_values"] = round(count * 32 / ((16 if marker == "sdot" else 8) * ops), 2)
            elif x86_values(body):
                entry["per_32_values"] = round(count * 32 / x86_values(body), 2)
        else:
            entry["loop"] = f"no loop with {marker}"
        result[kind] = entry
    print("CHILD " + json.dumps(result), flush=True)
    return 0


def run_child(kinds, env_extra, timeout=1800):
    env = dict(os.environ)
    for key in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES"):
        env.pop(key, None)
    env.update(env_extra)
    t = time.time()
    # Without a binfmt_misc handler an emulated process cannot start an arm64 program, but it can start
    # QEMU itself (a host program): arm64_check.sh then names it in ARM64_PROBE_QEMU.
    qemu = os.environ.get("ARM64_PROBE_QEMU")
    prefix = [qemu, "-cpu", os.environ.get("QEMU_CPU", "max")] if qemu else []
    command = prefix + [sys.executable, os.path.abspath(__file__), "--child", ",".join(kinds)]
    p = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    out = {"returncode": p.returncode, "wall_s": round(time.time() - t, 1)}
    for line in p.stdout.splitlines():
        if line.startswith("CHILD "):
            out.update(json.loads(line[6:]))
    if p.returncode != 0:
        err = [l for l in p.stderr.splitlines() if l.strip() and "/proc/cpuinfo" not in l]
        out["stderr"] = [l for l in err if l.startswith("LLVM ERROR")][:1] + err[-1:]
    return out


def show(label, out):
    loops = {}
    for kind in ("loop", "sdot", "sdot2", "smmla"):
        entry = out.pop(kind, None)
        if isinstance(entry, dict) and isinstance(entry.get("loop"), list):
            loops[kind] = entry.pop("loop")
        if entry is not None:
            out[kind] = entry
    report(label, json.dumps(out))
    for kind, lines in loops.items():
        print(f"probe: {label} {kind} inner loop:")
        for line in lines:
            print(f"    {line}")


def main(argv: list[str]) -> int:
    if "--child" in argv:
        return child(argv[argv.index("--child") + 1].split(","))
    quick = "--quick" in argv
    arm = platform.system() == "Linux" and platform.machine() == "aarch64"
    report("machine", f"{platform.machine()} python {platform.python_version()} QEMU_CPU={os.environ.get('QEMU_CPU', '-')}")
    if arm:
        hwcap, hwcap2 = hwcaps()
        bits = {name: hwcap >> bit & 1 for name, bit in HWCAP_BITS.items()}
        bits.update({name: hwcap2 >> bit & 1 for name, bit in HWCAP2_BITS.items()})
        report("hwcap", f"AT_HWCAP=0x{hwcap:x} AT_HWCAP2=0x{hwcap2:x} " + " ".join(f"{k}={v}" for k, v in bits.items()))
    features = arm64_features()
    report("detected", ",".join(sorted(features)) or "none")
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("Features", "flags", "model name", "CPU part"))][:2]
        report("/proc/cpuinfo", " | ".join(l.strip()[:100] for l in lines))
    except OSError as e:
        report("/proc/cpuinfo", repr(e))

    t = time.time()
    import numba
    from numba import njit

    report("import numba", f"{time.time() - t:.1f} s (numba {numba.__version__})")
    t = time.time()

    @njit
    def add(x, y):
        return x + y

    ok = add(2, 3) == 5
    report("first @njit compile + call", f"{time.time() - t:.1f} s, correct={ok}")
    from llvmlite import binding
    from numba.core import codegen, config

    host = binding.get_host_cpu_features()
    on = sorted(k for k, v in host.items() if v)
    interesting = [f for f in ("neon", "fp-armv8", "dotprod", "i8mm", "sve", "sve2", "bf16", "avx2", "avx512vnni", "avxvnni") if f in host]
    report("llvm host cpu", f"{binding.get_host_cpu_name()} (llvm {'.'.join(map(str, binding.llvm_version_info))})")
    report("llvm host features", " ".join(f"{f}={'+' if host[f] else '-'}" for f in interesting) + f" ({len(on)} on)")
    report("numba config", f"CPU_NAME={config.CPU_NAME} CPU_FEATURES={config.CPU_FEATURES}")
    name = config.CPU_NAME or binding.get_host_cpu_name()
    used = (config.CPU_FEATURES if config.CPU_FEATURES is not None else codegen.get_host_cpu_features()).split(",")
    keep = [f for f in used if f[1:] in interesting]
    report("numba compiles for", f"cpu={name} features: {' '.join(keep) or '(none of ' + ', '.join(interesting) + ')'}")

    if not arm:
        show("x86 plain loop (numba's own target)", run_child(["loop"], {}))
        return 0
    # Numba's own target (from LLVM's host detection), then the target from HWCAP.
    show("numba's own target", run_child(["loop"], {}))
    hw = llvm_target(features)
    kinds = ["loop"] + (["sdot", "sdot2"] if "dotprod" in features else []) + (["smmla"] if "i8mm" in features else [])
    show(f"target from HWCAP ({hw['NUMBA_CPU_FEATURES']})", run_child(kinds, hw))
    if "dotprod" not in features:  # the instruction on a CPU without it: does the emulated CPU trap?
        show("sdot compiled with +dotprod on this CPU without it", run_child(["sdot"], llvm_target({"dotprod"})))
    if "i8mm" not in features:
        show("smmla compiled with +i8mm on this CPU without it", run_child(["smmla"], llvm_target({"dotprod", "i8mm"})))
    if not quick:  # compiling an intrinsic for a target without its feature
        show("sdot compiled for a target without dotprod", run_child(["sdot"], llvm_target(set())))
        show("smmla compiled for a target with dotprod, without i8mm", run_child(["smmla"], llvm_target({"dotprod"})))
    return 0


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):  # no parser: print what it does, before it writes or runs anything
        sys.exit(print(__doc__.strip()))
    sys.exit(main(sys.argv[1:]))
