"""Write the torch checkpoint fixtures of tests/test_torch_zip.py and tests/test_torch_model.py
(dev-only: needs torch).

Outputs, all deterministic (torch.save uses fixed zip timestamps and a content-derived
serialization id; the npz is written with fixed timestamps too):
  tests/fixtures/torch_tiny.bin           - a state dict saved by torch.save
  tests/fixtures/torch_tiny_expected.npz  - the same values as plain NumPy (bf16 widened to float32)
  tests/fixtures/torch_micro_model/       - pytorch_model.bin + config.json: the "micro" random
      model of tools/random_checkpoint.py (seed 0) in the legacy bigcode/santacoder layout, float16,
      with lm_head.weight tied to transformer.wte.weight (one storage, as torch saves tied weights)
      and the attn.bias / attn.masked_bias buffers; no tokenizer.json (santacpu falls back to its
      bundled one). The test rebuilds the same model as safetensors with
      write_checkpoint(size="micro", layout="legacy", dtype="float16", seed=0,
      embedding_names=("transformer.wte.weight", "lm_head.weight")).

Run: /work/venv/bin/python tools/make_torch_fixture.py
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
MICRO_MODEL = FIXTURES / "torch_micro_model"
sys.path.insert(0, str(REPO))

from tools.random_checkpoint import canonical_tensors, config_json, layout_tensors  # noqa: E402


def build_state_dict() -> OrderedDict:
    # Values come from arange/sin, not an RNG, so they cannot drift between torch versions.
    wte = torch.sin(torch.arange(20, dtype=torch.float32)).reshape(5, 4)
    base = torch.arange(10, dtype=torch.float32) * 0.5
    sd = OrderedDict()
    sd["wte.weight"] = wte                                                   # fp32 2-D
    sd["ln.bias"] = (torch.arange(6, dtype=torch.float32) / 3).half()        # fp16 1-D
    sd["mlp.bf16"] = (torch.arange(-3, 5, dtype=torch.float32) * 1.375).bfloat16()  # bf16
    sd["attn.transposed"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # strides (1, 4)
    sd["offset.slice"] = base[3:7]                                           # storage_offset 3
    sd["positions"] = torch.arange(7, dtype=torch.int64)                     # int64
    sd["scale"] = torch.tensor(3.5)                                          # 0-d scalar
    sd["lm_head.weight"] = wte                                               # tied to wte.weight
    return sd


def to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        t = t.float()  # exact: every bf16 is a float32
    return t.contiguous().numpy().copy()  # (np.ascontiguousarray would make a 0-d array 1-d)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # np.savez stamps the current time into the zip; write entries with a fixed date instead.
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)),
                        buf.getvalue())


def build_micro_state_dict() -> OrderedDict:
    """The micro model in the legacy layout, shaped like the real bigcode/santacoder
    pytorch_model.bin (contiguous tensors, mask buffers, lm_head.weight last and tied), but float16
    to stay small (write_checkpoint's rule: float32 tensors take the file dtype, the uint8 mask
    keeps its own)."""
    sd = OrderedDict()
    for name, array in layout_tensors(canonical_tensors("micro", 0), "micro", "legacy"):
        if array.dtype == np.float32:
            array = array.astype(np.float16)
        # A C-ordered copy (np.ascontiguousarray would turn the 0-d masked_bias into 1-d).
        sd[name] = torch.from_numpy(np.array(array, order="C"))
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # same tensor: torch.save writes one storage
    return sd


def write_micro_model(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(build_micro_state_dict(), folder / "pytorch_model.bin")
    config = config_json("micro", "legacy")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    sd = build_state_dict()
    assert not sd["attn.transposed"].is_contiguous()
    assert sd["offset.slice"].storage_offset() == 3
    torch.save(sd, FIXTURES / "torch_tiny.bin")
    write_npz(FIXTURES / "torch_tiny_expected.npz", {k: to_numpy(v) for k, v in sd.items()})
    write_micro_model(MICRO_MODEL)
    for path in (FIXTURES / "torch_tiny.bin", FIXTURES / "torch_tiny_expected.npz",
                 MICRO_MODEL / "pytorch_model.bin", MICRO_MODEL / "config.json"):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):  # no parser: print what it does, before it writes or runs anything
        sys.exit(print(__doc__.strip()))
    main()
