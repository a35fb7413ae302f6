"""Write the tiny torch checkpoint fixture used by tests/test_torch_zip.py (dev-only: needs torch).

Outputs, both deterministic (torch.save uses fixed zip timestamps and a content-derived
serialization id; the npz is written with fixed timestamps too):
  tests/fixtures/torch_tiny.bin           - a state dict saved by torch.save
  tests/fixtures/torch_tiny_expected.npz  - the same values as plain NumPy (bf16 widened to float32)

Run: /work/venv/bin/python tools/make_torch_fixture.py
"""

from __future__ import annotations

import io
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


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


def main() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    sd = build_state_dict()
    assert not sd["attn.transposed"].is_contiguous()
    assert sd["offset.slice"].storage_offset() == 3
    torch.save(sd, FIXTURES / "torch_tiny.bin")
    write_npz(FIXTURES / "torch_tiny_expected.npz", {k: to_numpy(v) for k, v in sd.items()})
    for name in ("torch_tiny.bin", "torch_tiny_expected.npz"):
        print(f"wrote {FIXTURES / name} ({(FIXTURES / name).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
