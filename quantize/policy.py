"""Which storage type each tensor gets: the per-tensor policy of a quantized file.

Default, per `--type` (quality per byte is what counts, so types are chosen by role, as
llama.cpp does):
- every linear weight (attention Q|K|V and output, MLP in and out) takes the chosen type;
- the tied embedding / LM head (the largest and most sensitive matrix) takes `q8_0` when the
  chosen type is `q8_0`, and `q6_0` for the 4-bit types (llama.cpp gives it Q6_K);
- LayerNorm parameters and biases stay float32 (they are tiny); the position embedding takes
  float16 (2% of a file in float32; float16's relative rounding, 2^-11, is far below any block
  format's);
- then, for the 4-bit types, up to `upgrade_budget` (default 1.5%) more bytes buy upgrades of linear
  weights to q6_0 or q8_0, and of the most used tokens' embedding rows (or the whole embedding) to q8_0. With calibration
  (the default for 4-bit types), each upgrade's cut of mean KLD is measured
  (quantize/sensitivity.py) and the budget buys the most cut per byte (`greedy_upgrades`).
  Without, it follows `upgrade_order` (no embedding rows): first the attention Q|K|V weights to
  q6_0 (llama.cpp's Q4_K_S and IQ4_NL give them Q5_K), then linear weights to q8_0, smallest
  matrices first. What each bought on the trained fixtures is in docs/quantization.md.
  A `SizeTarget` (`--bits-per-weight`, `--max-size`) replaces the percent: the budget is then the
  bytes between the file at its 4-bit base (no upgrade) and the target, spent the same way.
User overrides (`--keep PATTERN=TYPE`, shell-style patterns on canonical names such as `wte`,
`h.*.mlp_c_proj_weight`) win over the default, first match first. A matrix whose width is not a
multiple of the block size falls back to float16.

May import: `santacpu.formats` (blocks, split_rows), `santacpu.errors`.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from santacpu.errors import OptionValueError, SantacpuError, SantacpuWarning
from santacpu.formats.blocks import FORMATS, SYMMETRIC

STORAGE_TYPES = ("f32", "f16", *FORMATS)
FOUR_BIT_TYPES = ("q4_0", "q4_m")  # the types calibration and the upgrade budget serve
EMBEDDING_TYPE = {"q8_0": "q8_0", "q6_0": "q6_0", "q4_0": "q6_0", "q4_m": "q6_0"}


def parse_keep(rules: list[str]) -> list[tuple[str, str]]:
    """['wte=q8_0', 'h.0.*=f16'] -> [(pattern, type)], with clear errors."""
    parsed = []
    for rule in rules:
        pattern, sep, qtype = rule.partition("=")
        if not sep or not pattern or not qtype:
            raise SantacpuError(f"--keep takes PATTERN=TYPE (e.g. wte=q8_0), got '{rule}'")
        if qtype not in STORAGE_TYPES:
            raise SantacpuError(f"--keep {rule}: unknown type '{qtype}' (choose from {', '.join(STORAGE_TYPES)})")
        parsed.append((pattern, qtype))
    return parsed


DEFAULT_UPGRADE_BUDGET = 0.015
QKV_SUFFIX = ".attn_c_attn_weight"


def stored_bytes(qtype: str, shape: tuple[int, ...]) -> int:
    n = int(np.prod(shape))
    if qtype == "f32":
        return 4 * n
    if qtype == "f16":
        return 2 * n
    return FORMATS[qtype].nbytes(*shape)


UPGRADE_TYPES = ("q6_0", "q8_0")  # what a 4-bit linear weight can be raised to, in order
ROW_UPGRADE_TYPE = "q8_0"  # what the embedding's most used rows can be raised to
# Embedding types whose rows can be raised: those that widen to q8_0 exactly (the CUDA backend's need).
ROW_UPGRADE_BASES = tuple(t for t in SYMMETRIC if t != ROW_UPGRADE_TYPE)
# The steps measured and bought; past them, the model's vocabulary size stands for the whole matrix
# raised (stored as one ROW_UPGRADE_TYPE matrix, no row ids): what a size target near q8_0's needs.
EMBEDDING_ROW_COUNTS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def greedy_upgrades(gains: dict[str, dict], extra: dict[str, dict], budget: float) -> dict:
    """{candidate: level} bought within `budget` bytes from measured gains ({candidate: {level:
    mean-KLD cut}}, levels in ascending order: a linear weight's upgrade types, or a number of
    embedding rows) and costs ({candidate: {level: extra bytes}}): each step takes the raise (from
    a candidate's current level to any higher one) with the largest positive cut per extra byte
    that still fits."""
    chosen: dict = {}
    while True:
        best = None
        for name, by_level in gains.items():
            levels = list(by_level)
            current = chosen.get(name)
            for level in levels[levels.index(current) + 1 if current is not None else 0 :]:
                cut = by_level[level] - (by_level[current] if current is not None else 0.0)
                cost = extra[name][level] - (extra[name][current] if current is not None else 0)
                rate = cut / cost if cost > 0 else math.inf  # (a raise can be free: small matrices' blocks)
                if cut > 0 and cost <= budget and (best is None or rate > best[0]):
                    best = (rate, name, level, cost)
        if best is None:
            return chosen
        _, name, level, cost = best
        chosen[name] = level
        budget -= cost


def row_upgrade_bytes(base: str, cols: int, rows: int) -> int:
    """Extra bytes of `rows` embedding rows at ROW_UPGRADE_TYPE instead of `base` (and their ids)."""
    return rows * (FORMATS[ROW_UPGRADE_TYPE].nbytes(1, cols) - FORMATS[base].nbytes(1, cols) + 4)


def embedding_upgrade_bytes(base: str, shape: tuple[int, int], rows: int) -> int:
    """Extra bytes of raising `rows` of the embedding (shape [vocab, cols]) from `base`: split rows
    with their ids, or with every row the whole matrix at ROW_UPGRADE_TYPE (no ids)."""
    if rows >= shape[0]:
        return stored_bytes(ROW_UPGRADE_TYPE, shape) - stored_bytes(base, shape)
    return row_upgrade_bytes(base, shape[1], rows)


def whole_blocks(shape: tuple[int, ...]) -> bool:
    """Whether a matrix's rows are whole blocks of the upgrade types (others stay float16)."""
    return shape[1] % FORMATS["q8_0"].block_size == 0


def upgradable(shapes: dict[str, tuple[int, ...]], types: dict[str, str], qtype: str) -> list[str]:
    """The weights the budget may raise: those at the file's 4-bit type, in whole blocks."""
    return [n for n in shapes if types[n] == qtype and whole_blocks(shapes[n])]


def upgrade_order(shapes: dict[str, tuple[int, ...]], types: dict[str, str], qtype: str) -> list[tuple[str, str]]:
    """The upgrades the budget buys when nothing was measured, in order: first every attention
    Q|K|V weight to q6_0 (layer order), then every linear weight to q8_0, smallest first (file
    order on ties)."""
    whole = upgradable(shapes, types, qtype)
    qkv = [(n, "q6_0") for n in whole if n.endswith(QKV_SUFFIX)]
    return qkv + [(n, "q8_0") for n in sorted(whole, key=lambda n: int(np.prod(shapes[n])))]


@dataclass(frozen=True)
class SizeTarget:
    """A bound on a 4-bit file's size that the upgrades fill: `bits_per_weight` over the matrices
    (what `santacpu info` and the report count: every 2-D tensor's stored bytes, block scales, the
    position embedding's float16 and the raised embedding rows' ids included, over its weights;
    LayerNorm parameters and biases left out), or `max_size` in MB (10^6 bytes) of the whole file."""

    bits_per_weight: float | None = None
    max_size: float | None = None  # MB

    def __post_init__(self):
        given = [v for v in (self.bits_per_weight, self.max_size) if v is not None]
        if len(given) != 1:
            raise OptionValueError("--bits-per-weight and --max-size: give one of them, not both")
        if not (isinstance(given[0], (int, float)) and not isinstance(given[0], bool) and given[0] > 0
                and np.isfinite(given[0])):
            raise OptionValueError(f"{self.option} takes a positive number, got {given[0]!r}")

    @property
    def option(self) -> str:
        return "--bits-per-weight" if self.bits_per_weight is not None else "--max-size"

    @property
    def value(self) -> float:
        """The number given to `option`."""
        return self.bits_per_weight if self.bits_per_weight is not None else self.max_size

    @staticmethod
    def _matrix_weights(shapes: dict[str, tuple[int, ...]]) -> int:
        """The weights --bits-per-weight counts: every 2-D tensor's."""
        return sum(int(np.prod(s)) for s in shapes.values() if len(s) == 2)

    def counts(self, shape: tuple[int, ...]) -> bool:
        """Whether a tensor of this shape is counted (the whole file for --max-size, matrices for
        --bits-per-weight)."""
        return self.max_size is not None or len(shape) == 2

    def limit(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """The most bytes the counted tensors (and for --max-size the file's header) may take."""
        if self.max_size is not None:
            return int(np.floor(self.max_size * 1e6 + 1e-6))
        return int(np.floor(self.bits_per_weight * self._matrix_weights(shapes) / 8 + 1e-6))

    def in_units(self, counted: int, shapes: dict[str, tuple[int, ...]]) -> float:
        """`counted` bytes in the target's unit: bits per weight, or MB."""
        if self.max_size is not None:
            return counted / 1e6
        return 8 * counted / self._matrix_weights(shapes)

    def unit(self) -> str:
        return "bits/weight" if self.bits_per_weight is not None else "MB"

    def describe(self) -> dict:
        return {"bits_per_weight": self.bits_per_weight} if self.bits_per_weight is not None else \
            {"max_size_mb": self.max_size}


@dataclass
class Plan:
    """What a file stores: each tensor's type, and how many of the most used tokens' embedding
    rows are raised to ROW_UPGRADE_TYPE (santacpu.formats.split_rows)."""

    types: dict[str, str]
    embedding_rows: int = 0


@dataclass
class Policy:
    qtype: str  # the file's main type, for the linear weights
    keep: list[tuple[str, str]] = field(default_factory=list)
    upgrade_budget: float = DEFAULT_UPGRADE_BUDGET  # extra bytes, as a fraction of the file, for q8_0 upgrades
    size_target: SizeTarget | None = None  # instead of upgrade_budget: the size the upgrades fill

    def __post_init__(self):
        if self.qtype not in FORMATS:
            raise SantacpuError(f"unknown quantization type '{self.qtype}' (choose from {', '.join(FORMATS)})")
        if self.size_target is not None and self.qtype not in FOUR_BIT_TYPES:
            raise OptionValueError(f"{self.size_target.option} serves the 4-bit types ({', '.join(FOUR_BIT_TYPES)}), "
                                   f"as the upgrade budget does: a {self.qtype} file has no upgrades to size")

    @property
    def buys_upgrades(self) -> bool:
        """Whether the upgrade budget spends anything (4-bit types with a budget or a size target):
        the only case where measured upgrade gains matter."""
        return self.qtype in FOUR_BIT_TYPES and (self.size_target is not None or self.upgrade_budget > 0)

    def kept(self, name: str) -> bool:
        """Whether a --keep rule decides this tensor's type (no upgrade can change it)."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern, _ in self.keep)

    def counted_bytes(self, shapes: dict[str, tuple[int, ...]], plan: Plan, overhead: int = 0) -> int:
        """What the size target counts of a plan: the matrices' stored bytes (--bits-per-weight), or
        every tensor's and `overhead`, the file's bytes that are no tensor (--max-size)."""
        target = self.size_target
        total = sum(stored_bytes(plan.types[n], s) for n, s in shapes.items() if target.counts(s))
        if plan.embedding_rows:
            total += row_upgrade_bytes(plan.types["wte"], shapes["wte"][1], plan.embedding_rows)
        return total + (overhead if target.max_size is not None else 0)

    def base_plan(self, shapes: dict[str, tuple[int, ...]]) -> Plan:
        """The file without upgrades (--keep rules applied)."""
        return Plan({name: self.type_for(name, shape) for name, shape in shapes.items()})

    def smallest(self, shapes: dict[str, tuple[int, ...]], overhead: int = 0) -> int:
        """The counted bytes of the file without upgrades: the least a size target can ask for."""
        return self.counted_bytes(shapes, self.base_plan(shapes), overhead)

    def check_target(self, shapes: dict[str, tuple[int, ...]], overhead: int = 0) -> None:
        """An OptionValueError if the size target is below the file without upgrades, saying the
        smallest value it can take for this model and type."""
        target, least = self.size_target, self.smallest(shapes, overhead)
        if target is None or target.limit(shapes) >= least:
            return
        smallest = np.ceil(target.in_units(least, shapes) * 100 - 1e-9) / 100
        raise OptionValueError(f"{target.option} {target.value:g} is below the smallest {self.qtype} file of this model "
                               f"(no upgrades): give at least {smallest:.2f} {target.unit()}")

    def budget_bytes(self, shapes: dict[str, tuple[int, ...]], overhead: int = 0) -> float:
        """The bytes the upgrades may spend: the percent of the file's default types, or the room
        between the file without upgrades and the size target (`overhead`: see counted_bytes;
        `check_target` says whether the target can be met at all)."""
        if self.size_target is None:
            return self.upgrade_budget * sum(stored_bytes(self.default_type(n, s), s) for n, s in shapes.items())
        return max(0, self.size_target.limit(shapes) - self.smallest(shapes, overhead))

    def default_type(self, name: str, shape: tuple[int, ...]) -> str:
        if len(shape) != 2:
            return "f32"
        if name == "wpe":
            return "f16"
        chosen = EMBEDDING_TYPE.get(self.qtype, self.qtype) if name == "wte" else self.qtype
        return "f16" if chosen in FORMATS and shape[1] % FORMATS[chosen].block_size else chosen

    def assign(self, shapes: dict[str, tuple[int, ...]], gains: dict[str, dict] | None = None) -> dict[str, str]:
        """The storage type of every tensor (see `plan`)."""
        return self.plan(shapes, gains).types

    def plan(self, shapes: dict[str, tuple[int, ...]], gains: dict[str, dict] | None = None, overhead: int = 0) -> Plan:
        """The storage of every tensor of a model (canonical name -> shape); warns about a
        --keep pattern that matches none of them (a typo would otherwise pass silently). With
        `gains` (quantize/sensitivity.py: each linear weight's measured mean-KLD cut per upgrade
        type, and under "wte" the cut of raising the most used embedding rows, per row count)
        the budget buys the most cut per byte; without, it follows `upgrade_order`. A tensor a
        --keep rule names is never upgraded. `overhead`: the file's bytes that are no tensor, which
        a --max-size target counts."""
        for pattern, _ in self.keep:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in shapes):
                warnings.warn(
                    f"--keep pattern '{pattern}' matches no tensor (names are like wte, wpe, "
                    "h.0.attn_c_attn_weight, h.*.mlp_c_proj_weight, ln_f_weight)",
                    SantacpuWarning,
                    stacklevel=2,
                )
        types = {name: self.default_type(name, shape) for name, shape in shapes.items()}
        embedding_rows = 0
        if self.buys_upgrades:
            budget = self.budget_bytes(shapes, overhead)
            free = {n: s for n, s in shapes.items() if not self.kept(n)}
            if gains is not None:
                extra = {n: {t: stored_bytes(t, shapes[n]) - stored_bytes(types[n], shapes[n]) for t in UPGRADE_TYPES}
                         for n in upgradable(free, types, self.qtype) if n in gains}
                candidates = {n: gains[n] for n in extra}
                base = self.type_for("wte", shapes["wte"]) if "wte" in shapes else None
                if "wte" in gains and base in ROW_UPGRADE_BASES and not self.kept("wte"):
                    candidates["wte"] = {k: cut for k, cut in gains["wte"].items() if k <= shapes["wte"][0]}
                    extra["wte"] = {k: embedding_upgrade_bytes(base, shapes["wte"], k) for k in candidates["wte"]}
                chosen = greedy_upgrades(candidates, extra, budget)
                embedding_rows = chosen.pop("wte", 0)
                if embedding_rows >= shapes["wte"][0]:  # every row: the whole matrix at the higher type
                    chosen["wte"], embedding_rows = ROW_UPGRADE_TYPE, 0
                types.update(chosen)
            else:
                for name, upgrade in upgrade_order(free, types, self.qtype):
                    extra_bytes = stored_bytes(upgrade, shapes[name]) - stored_bytes(types[name], shapes[name])
                    if extra_bytes > budget:
                        break
                    types[name], budget = upgrade, budget - extra_bytes
        return Plan({name: self.type_for(name, shape, types[name]) for name, shape in shapes.items()}, embedding_rows)

    def type_for(self, name: str, shape: tuple[int, ...], chosen: str | None = None) -> str:
        """One tensor's type: `chosen` (default: the role's type), then the --keep rules, then the
        fallbacks (vectors are never block-quantized; a width that is not whole blocks -> f16)."""
        chosen = chosen or self.default_type(name, shape)
        for pattern, qtype in self.keep:
            if fnmatch.fnmatchcase(name, pattern):
                chosen = qtype
                break
        if chosen in FORMATS:
            if len(shape) != 2:
                return "f32"  # vectors are never block-quantized
            if shape[1] % FORMATS[chosen].block_size:
                return "f16"
        return chosen

    def describe(self) -> dict:
        return {
            "type": self.qtype,
            "embedding": EMBEDDING_TYPE.get(self.qtype, self.qtype),
            "keep": [f"{p}={t}" for p, t in self.keep],
            "upgrade_budget": None if self.size_target is not None else self.upgrade_budget,
            **({"size_target": self.size_target.describe()} if self.size_target is not None else {}),
        }
