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
  weights to q6_0 or q8_0, and of the most used tokens' embedding rows to q8_0. With calibration
  (the default for 4-bit types), each upgrade's cut of mean KLD is measured
  (quantize/sensitivity.py) and the budget buys the most cut per byte (`greedy_upgrades`).
  Without, it follows `upgrade_order` (no embedding rows): first the attention Q|K|V weights to
  q6_0 (llama.cpp's Q4_K_S and IQ4_NL give them Q5_K), then linear weights to q8_0, smallest
  matrices first. What each bought on the trained fixtures is in docs/quantization.md.
User overrides (`--keep PATTERN=TYPE`, shell-style patterns on canonical names such as `wte`,
`h.*.mlp_c_proj_weight`) win over the default, first match first. A matrix whose width is not a
multiple of the block size falls back to float16.

May import: `santacpu.formats` (blocks, split_rows), `santacpu.errors`.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field

import numpy as np

from santacpu.errors import SantacpuError, SantacpuWarning
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
EMBEDDING_ROW_COUNTS = (64, 128, 256, 512, 1024, 2048, 4096)  # the steps measured and bought


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
                if cut > 0 and cost <= budget and (best is None or cut / cost > best[0]):
                    best = (cut / cost, name, level, cost)
        if best is None:
            return chosen
        _, name, level, cost = best
        chosen[name] = level
        budget -= cost


def row_upgrade_bytes(base: str, cols: int, rows: int) -> int:
    """Extra bytes of `rows` embedding rows at ROW_UPGRADE_TYPE instead of `base` (and their ids)."""
    return rows * (FORMATS[ROW_UPGRADE_TYPE].nbytes(1, cols) - FORMATS[base].nbytes(1, cols) + 4)


def upgradable(shapes: dict[str, tuple[int, ...]], types: dict[str, str], qtype: str) -> list[str]:
    """The weights the budget may raise: those at the file's 4-bit type, in whole blocks."""
    return [n for n in shapes if types[n] == qtype and shapes[n][1] % FORMATS["q8_0"].block_size == 0]


def upgrade_order(shapes: dict[str, tuple[int, ...]], types: dict[str, str], qtype: str) -> list[tuple[str, str]]:
    """The upgrades the budget buys when nothing was measured, in order: first every attention
    Q|K|V weight to q6_0 (layer order), then every linear weight to q8_0, smallest first (file
    order on ties)."""
    whole = upgradable(shapes, types, qtype)
    qkv = [(n, "q6_0") for n in whole if n.endswith(QKV_SUFFIX)]
    return qkv + [(n, "q8_0") for n in sorted(whole, key=lambda n: int(np.prod(shapes[n])))]


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

    def __post_init__(self):
        if self.qtype not in FORMATS:
            raise SantacpuError(f"unknown quantization type '{self.qtype}' (choose from {', '.join(FORMATS)})")

    @property
    def buys_upgrades(self) -> bool:
        """Whether the upgrade budget spends anything (4-bit types with a budget): the only case
        where measured upgrade gains matter."""
        return self.qtype in FOUR_BIT_TYPES and self.upgrade_budget > 0

    def default_type(self, name: str, shape: tuple[int, ...]) -> str:
        if len(shape) != 2:
            return "f32"
        if name == "wpe":
            return "f16"
        if name == "wte":
            return EMBEDDING_TYPE.get(self.qtype, self.qtype)
        return self.qtype

    def assign(self, shapes: dict[str, tuple[int, ...]], gains: dict[str, dict] | None = None) -> dict[str, str]:
        """The storage type of every tensor (see `plan`)."""
        return self.plan(shapes, gains).types

    def plan(self, shapes: dict[str, tuple[int, ...]], gains: dict[str, dict] | None = None) -> Plan:
        """The storage of every tensor of a model (canonical name -> shape); warns about a
        --keep pattern that matches none of them (a typo would otherwise pass silently). With
        `gains` (quantize/sensitivity.py: each linear weight's measured mean-KLD cut per upgrade
        type, and under "wte" the cut of raising the most used embedding rows, per row count)
        the budget buys the most cut per byte; without, it follows `upgrade_order`."""
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
            budget = self.upgrade_budget * sum(stored_bytes(types[n], s) for n, s in shapes.items())
            if gains is not None:
                extra = {n: {t: stored_bytes(t, shapes[n]) - stored_bytes(types[n], shapes[n]) for t in UPGRADE_TYPES}
                         for n in upgradable(shapes, types, self.qtype) if n in gains}
                candidates = {n: gains[n] for n in extra}
                base = self.type_for("wte", shapes["wte"]) if "wte" in shapes else None
                if "wte" in gains and base in ROW_UPGRADE_BASES:
                    rows, cols = shapes["wte"]
                    candidates["wte"] = {k: cut for k, cut in gains["wte"].items() if k < rows}
                    extra["wte"] = {k: row_upgrade_bytes(base, cols, k) for k in candidates["wte"]}
                chosen = greedy_upgrades(candidates, extra, budget)
                embedding_rows = chosen.pop("wte", 0)
                types.update(chosen)
            else:
                for name, upgrade in upgrade_order(shapes, types, self.qtype):
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
            "upgrade_budget": self.upgrade_budget,
        }
