#!/usr/bin/env bash
# ARM64 checks without ARM hardware (issue 27): QEMU user-mode emulation of an arm64 Debian root,
# with NumPy/Numba arm64 wheels from the package index. A developer script, not part of CI (slow).
# Time on 2 x86 cores: setup once, a few minutes; the probe 25-45 s a model; the default tests about
# 9-11 min a model (all three: about 30 min); tests/test_repack.py about 1 min a model.
#
#   sudo tools/arm64_check.sh                      # setup (once), probe, default tests, each CPU model
#   sudo tools/arm64_check.sh tests/test_kernels.py -k matvec   # another pytest selection
#   sudo tools/arm64_check.sh --setup-only | --probe-only   # (--setup: the same as --setup-only)
#   sudo tools/arm64_check.sh --tests-only tests/test_repack.py   # pytest only, no probe (~10 s a
#                                                                     # model for a trivial test file)
#
# Setup, each step skipped when already done (needs root, apt and pip access to the package index):
#   1. apt: qemu-user-static, binfmt-support, debootstrap;
#   2. the binfmt_misc handler for arm64 ELF files (mounts /proc/sys/fs/binfmt_misc if needed), so
#      that arm64 programs started by arm64 programs (debootstrap's second stage, tests that run
#      sys.executable) run under QEMU too, with the CPU model of QEMU_CPU. Without it
#      (SANTACPU_ARM64_BINFMT=0, or where binfmt_misc cannot be mounted) the root is made by
#      debootstrap --foreign with every package unpacked, not configured; the probe starts its
#      children through QEMU itself, and tests that start arm64 programs fail;
#   3. an arm64 Debian root ($SANTACPU_ARM64_ROOT, default /var/cache/santacpu-arm64/root, about
#      300 MB; outside the repository) by debootstrap --variant=minbase --include=python3;
#   4. the Python packages, arm64 wheels installed by this machine's pip (pip install --target
#      --platform manylinux..._aarch64, no emulation) into ROOT/opt/santacpu-site: pyproject.toml's
#      dependencies (numpy, numba, ...), llvmlite and pytest, at the versions of .venv when it has
#      them (about 350 MB); reinstalled when that list changes.
# Each run copies the working tree (tracked and untracked, not ignored files) to ROOT/repo, then for
# each CPU model of $SANTACPU_ARM64_CPUS (default "max neoverse-n1 cortex-a72": dotprod + i8mm,
# dotprod only, neither) runs, inside `chroot ROOT qemu-aarch64-static -cpu MODEL`:
# tools/arm64_probe.py (HWCAP bits, what LLVM/Numba detect, the sdot/smmla intrinsics and the
# vectorised int8 loop; --quick after the first model), then pytest on the selection (default
# $DEFAULT_TESTS below), each with a fresh Numba cache. QEMU user mode shows the host's /proc/cpuinfo
# (and the root has no /proc), so only getauxval(AT_HWCAP/AT_HWCAP2) tells the emulated model's
# features. Logs: $OUT (default /var/cache/santacpu-arm64/out), one per model and step, and a summary.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="${SANTACPU_ARM64_ROOT:-/var/cache/santacpu-arm64/root}"
SUITE="${SANTACPU_ARM64_SUITE:-bookworm}"
MIRROR="${SANTACPU_ARM64_MIRROR:-http://deb.debian.org/debian}"
CPUS="${SANTACPU_ARM64_CPUS:-max neoverse-n1 cortex-a72}"
OUT="${OUT:-/var/cache/santacpu-arm64/out}"
TIMEOUT="${SANTACPU_ARM64_TIMEOUT:-3600}"  # seconds per emulated run
DEFAULT_TESTS="tests/test_repack.py tests/test_token_invariance.py tests/test_quant_kernels.py tests/test_kernels.py"
SITE=/opt/santacpu-site  # inside ROOT

mode=all
case "${1:-}" in
  --setup-only|--setup) mode=setup; shift ;;
  --tests-only) mode=tests; shift ;;
  --probe-only) mode=probe; shift ;;
  -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d'; exit 0 ;;
esac
if [ $# -gt 0 ]; then TESTS=("$@"); else read -ra TESTS <<<"$DEFAULT_TESTS"; fi

say() { printf '[arm64_check %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { say "error: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, binfmt_misc)"
mkdir -p "$OUT"

# 1. Host tools.
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null || ! command -v update-binfmts >/dev/null; then
  say "installing qemu-user-static binfmt-support debootstrap"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static binfmt-support debootstrap >/dev/null \
    || die "apt-get install failed"
fi
QEMU="$(command -v qemu-aarch64-static)"

# 2. binfmt_misc: arm64 ELF files run under QEMU (F: the interpreter is opened now, so it works in the chroot).
# SANTACPU_ARM64_BINFMT=0: leave binfmt_misc alone and do without it.
if [ "${SANTACPU_ARM64_BINFMT:-1}" != 0 ]; then
  if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || say "cannot mount binfmt_misc"
  fi
  if ! grep -qs enabled /proc/sys/fs/binfmt_misc/qemu-aarch64; then
    update-binfmts --enable qemu-aarch64 2>/dev/null || update-binfmts --import qemu-aarch64 2>/dev/null || true
  fi
fi
if [ "${SANTACPU_ARM64_BINFMT:-1}" != 0 ] && grep -qs enabled /proc/sys/fs/binfmt_misc/qemu-aarch64; then
  BINFMT=1
else
  BINFMT=0
  say "no binfmt_misc handler: arm64 programs run under $QEMU, but those they start fail (the probe starts QEMU itself)"
  export ARM64_PROBE_QEMU=/usr/bin/qemu-aarch64-static
fi

# 3. The arm64 root.
if [ ! -x "$ROOT/usr/bin/python3" ]; then
  mkdir -p "$(dirname "$ROOT")"
  t0=$SECONDS
  if [ "$BINFMT" = 1 ]; then
    say "debootstrap $SUITE arm64 into $ROOT (a few minutes)"
    debootstrap --arch=arm64 --variant=minbase --include=python3 "$SUITE" "$ROOT" "$MIRROR" >"$OUT/debootstrap.log" 2>&1 \
      || die "debootstrap failed, see $OUT/debootstrap.log"
  else
    # Without binfmt the second stage (arm64 maintainer scripts) cannot run: unpack every package instead.
    say "debootstrap --foreign $SUITE arm64 into $ROOT, packages unpacked without their scripts"
    debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 "$SUITE" "$ROOT" "$MIRROR" >"$OUT/debootstrap.log" 2>&1 \
      || die "debootstrap failed, see $OUT/debootstrap.log"
    for deb in "$ROOT"/var/cache/apt/archives/*.deb; do  # keeping merged /usr's /bin, /lib, /sbin links
      dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$ROOT" || die "cannot unpack $deb"
    done
  fi
  say "arm64 root ready in $((SECONDS - t0)) s: $(du -sh "$ROOT" | cut -f1)"
fi
cp -f "$QEMU" "$ROOT/usr/bin/qemu-aarch64-static"
PYVER="$(readlink "$ROOT/usr/bin/python3" | sed -n 's/^python\([0-9]*\.[0-9]*\)$/\1/p')"
[ -n "$PYVER" ] || die "cannot tell the root's Python version"

# 4. arm64 wheels, installed by the host's pip for the root's Python.
pin() {  # name==version as in .venv, or the bare name
  local v=""
  [ -x .venv/bin/python ] && v="$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null)"
  if [ -n "$v" ]; then echo "$1==$v"; else echo "$1"; fi
}
# pyproject.toml's dependencies (whatever they are now), llvmlite and pytest.
DEPS="$(python3 -c '
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(" ".join(re.match(r"[A-Za-z0-9_.-]+", d).group(0) for d in deps))' 2>/dev/null)" || DEPS=""
[ -n "$DEPS" ] || DEPS="numpy numba safetensors tokenizers huggingface_hub typer threadpoolctl"
REQS="$(for p in $DEPS llvmlite pytest; do pin "$p"; done | tr '\n' ' ')"
if [ "$(cat "$ROOT$SITE/.requirements" 2>/dev/null)" != "$PYVER $REQS" ]; then
  say "installing arm64 wheels for Python $PYVER: $REQS"
  PIP="${PIP:-$(command -v pip3 || echo "python3 -m pip")}"
  rm -rf "$ROOT$SITE"
  # shellcheck disable=SC2086
  $PIP install -q --no-warn-conflicts --disable-pip-version-check --target "$ROOT$SITE" --only-binary=:all: \
    --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
    --python-version "$PYVER" --implementation cp $REQS >"$OUT/pip.log" 2>&1 || die "pip failed, see $OUT/pip.log"
  echo "$PYVER $REQS" >"$ROOT$SITE/.requirements"
fi
[ "$mode" = setup ] && { say "setup done: $ROOT"; exit 0; }

# The working tree, as it is now.
rm -rf "$ROOT/repo" && mkdir -p "$ROOT/repo"
git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$ROOT/repo"

emulate() {  # emulate CPU LOG PYTHON-ARGS...: the root's python3 in /repo, output to LOG and stdout
  local cpu="$1" log="$2"; shift 2
  rm -rf "$ROOT/tmp/numba-cache-$cpu"  # one per model, emptied each run: no compiled code is shared
  local target=()
  [ -n "${NUMBA_TARGET:-}" ] && target=(NUMBA_CPU_NAME=generic NUMBA_CPU_FEATURES="$NUMBA_TARGET")
  env QEMU_CPU="$cpu" PYTHONPATH="$SITE:/repo" NUMBA_CACHE_DIR="/tmp/numba-cache-$cpu" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    "${target[@]}" HOME=/root LC_ALL=C.UTF-8 timeout "$TIMEOUT" nice -n 10 chroot "$ROOT" /usr/bin/qemu-aarch64-static -cpu "$cpu" \
    /usr/bin/python3 -c 'import os, runpy, sys; os.chdir("/repo"); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__") if sys.argv[0].endswith(".py") else runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)' \
    "$@" 2>&1 | tee "$log"
  return "${PIPESTATUS[0]}"
}

summary="$OUT/summary.txt"
: >"$summary"
first=1
for cpu in $CPUS; do
  if [ "$mode" != tests ]; then
    say "=== -cpu $cpu: probe"
    quick=--quick
    [ "$first" = 1 ] && quick=
    t0=$SECONDS
    emulate "$cpu" "$OUT/probe-$cpu.log" tools/arm64_probe.py $quick
    rc=$?
    hw="$(grep -m1 '^probe: hwcap' "$OUT/probe-$cpu.log" | sed 's/^probe: hwcap = //')"
    echo "-cpu $cpu: probe rc=$rc in $((SECONDS - t0)) s; $hw; detected: $(grep -m1 '^probe: detected' "$OUT/probe-$cpu.log" | sed 's/^probe: detected = //')" >>"$summary"
    first=0
  fi
  [ "$mode" = probe ] && continue
  # LLVM cannot see the emulated CPU (it reads the host's /proc/cpuinfo, or none): Numba compiles
  # for the features the model's hardware capabilities give (target.hardware_features), as LLVM
  # would detect them on that CPU, so the dotprod / i8mm targets run where the model has them.
  features="$(emulate "$cpu" /dev/null santacpu.backends.cpu.target | sed -n 's/^hardware features: //p')"
  say "=== -cpu $cpu: Numba target generic ${features:-(none)}; pytest ${TESTS[*]}"
  NUMBA_TARGET="$features"
  t0=$SECONDS
  # One process (the root has no pytest-xdist): without pyproject's xdist options.
  emulate "$cpu" "$OUT/pytest-$cpu.log" pytest -p no:cacheprovider -o addopts=-ra -q "${TESTS[@]}"
  rc=$?
  NUMBA_TARGET=
  echo "-cpu $cpu ($features): pytest rc=$rc in $((SECONDS - t0)) s: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/pytest-$cpu.log" | tail -1)" >>"$summary"
done
say "summary ($OUT):"
cat "$summary"
! grep -q 'rc=[1-9]' "$summary"
