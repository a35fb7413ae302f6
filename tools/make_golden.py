"""Write tests/fixtures/golden.npz: logits and greedy ids that transformers produces on tiny random
checkpoints, the oracle tests/test_golden.py holds santacpu's reference forward to (dev-only: needs
torch and transformers; the tests never import them).

For each variant (multi-query "mqa", multi-head "mha"), a tiny gpt_bigcode-layout checkpoint is
built from SEED with tools.random_checkpoint and run by `GPTBigCodeForCausalLM` (eager attention,
float32) on a few fixed prompts. Saved per variant and prompt (keys `{variant}.{prompt}.*`):
  ids      int64 [T]          the prompt
  logits   float32 [T-1, C]   logits of positions 0..T-2 at the shared `columns`
  last     float32 [V]        the full logits of the last position T-1
  greedy   int64 [16]         greedy continuation, padding rows 49157.. suppressed at every step
  margins  float32 [16]       top1 - top2 logit at each greedy step (after suppression)
Shared: `columns` (sorted; every row's argmax, all padding-row edges and a deterministic random
fill), `seed`, `n_new`, `pad_start`, the library versions, and per variant `{variant}.fp_*`: a few
weight values read straight from the checkpoint file, so a test can tell a changed generator from a
logits bug.

Run: /work/venv/bin/python tools/make_golden.py
"""

from __future__ import annotations

import io
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from santacpu.formats.safetensors_io import SafetensorsFile  # noqa: E402
from santacpu.tokenizer import Tokenizer  # noqa: E402
from tools.random_checkpoint import write_checkpoint  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "golden.npz"
SEED = 0
VARIANTS = {"mqa": True, "mha": False}  # name -> multi_query
N_NEW = 16  # greedy tokens; tiny n_positions is 64, so every prompt is <= 48 tokens
PAD_START = 49157  # rows 49157..vocab_size-1 are padding: never picked
N_COLUMNS = 768  # full last rows take ~1.46 MB of the <2 MB budget; lossless float32 barely compresses
MAX_BYTES = 2_000_000
MIN_MARGIN = 1e-3  # a greedy step closer than this would make exact agreement a coin flip

# Weight values checked before any logits (names in the gpt_bigcode file, flat indices).
FINGERPRINT = [
    ("transformer.wte.weight", [0, 1, 2, 49279 * 64 + 63]),
    ("transformer.wpe.weight", [0, 63 * 64 + 5]),
    ("transformer.h.0.attn.c_attn.weight", [0, 64 * 64 + 7, -1]),
    ("transformer.h.1.mlp.c_proj.weight", [0, -1]),
    ("transformer.ln_f.bias", [0, -1]),
]


def prompts(tok: Tokenizer) -> dict[str, list[int]]:
    snippet = (
        "import os\n\n\n"
        "def read_lines(path):\n"
        '    """Return the lines of a text file."""\n'
        "    with open(path) as f:\n"
        "        return [line.rstrip() for line in f]\n"
    )
    return {
        "header": tok.encode("def fibonacci(n):\n"),
        "snippet": tok.encode(snippet),
        "fim": [tok.fim_prefix_id, *tok.encode("def add(a, b):\n    "), tok.fim_suffix_id,
                *tok.encode("\n\nprint(add(1, 2))\n"), tok.fim_middle_id],
        "single": tok.encode("def"),
    }


def fingerprint(checkpoint_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tensor names, flat indices, values) of FINGERPRINT, read from model.safetensors as stored."""
    f = SafetensorsFile(checkpoint_dir / "model.safetensors")
    names, index, values = [], [], []
    for name, flat in FINGERPRINT:
        array = np.asarray(f.array(name)).reshape(-1)
        for i in flat:
            names.append(name)
            index.append(i % array.size)
            values.append(array[i])
    return np.array(names), np.array(index, dtype=np.int64), np.array(values, dtype=np.float32)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # np.savez_compressed stamps the current time into the zip; fixed dates keep the file reproducible.
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def main() -> None:
    import torch
    import transformers
    from transformers import GPTBigCodeForCausalLM

    from santacpu.network import reference
    from santacpu.loading.checkpoint import read_checkpoint

    torch.manual_seed(0)
    tok = Tokenizer.santacoder()
    prompt_ids = prompts(tok)
    out: dict[str, np.ndarray] = {
        "seed": np.int64(SEED),
        "n_new": np.int64(N_NEW),
        "pad_start": np.int64(PAD_START),
        "transformers_version": np.array(transformers.__version__),
        "torch_version": np.array(torch.__version__),
        "variants": np.array(list(VARIANTS)),
        "prompts": np.array(list(prompt_ids)),
    }
    full: dict[tuple[str, str], np.ndarray] = {}  # all-column logits, kept until columns are chosen
    margins_all = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant, multi_query in VARIANTS.items():
            ckpt = write_checkpoint(Path(tmp) / variant, size="tiny", layout="gpt_bigcode", seed=SEED,
                                    multi_query=multi_query)
            names, index, values = fingerprint(ckpt)
            out[f"{variant}.fp_names"], out[f"{variant}.fp_index"], out[f"{variant}.fp_values"] = names, index, values
            model = GPTBigCodeForCausalLM.from_pretrained(ckpt, attn_implementation="eager", dtype=torch.float32)
            model.eval()
            assert model.config.multi_query == multi_query
            weights = read_checkpoint(ckpt)  # only for a printed sanity check against santacpu's reference
            n_positions = model.config.n_positions
            for name, ids in prompt_ids.items():
                assert len(ids) + N_NEW <= n_positions, (name, len(ids))
                with torch.no_grad():
                    logits = model(torch.tensor([ids])).logits[0].float().numpy()
                full[variant, name] = logits
                # Greedy: full re-forward each step, padding rows suppressed before the argmax.
                seq, margins = list(ids), []
                with torch.no_grad():
                    for _ in range(N_NEW):
                        row = model(torch.tensor([seq])).logits[0, -1].float().numpy().copy()
                        row[PAD_START:] = -np.inf
                        top2 = np.partition(row, -2)[-2:]
                        margins.append(top2[1] - top2[0])
                        seq.append(int(np.argmax(row)))
                greedy = np.array(seq[len(ids):], dtype=np.int64)
                key = f"{variant}.{name}"
                out[key + ".ids"] = np.array(ids, dtype=np.int64)
                out[key + ".last"] = logits[-1].astype(np.float32)
                out[key + ".greedy"] = greedy
                out[key + ".margins"] = np.array(margins, dtype=np.float32)
                margins_all.append(min(margins))
                ref = reference.forward(weights, ids)
                err = np.abs(ref - logits).max() / np.abs(logits).max()
                print(f"{key:16s} T={len(ids):2d}  min greedy margin {min(margins):.4f}  "
                      f"max|logit| {np.abs(logits).max():.3f}  reference rel err {err:.2e}  "
                      f"greedy {tok.decode(greedy)!r}")
                assert min(margins) >= MIN_MARGIN, f"{key}: greedy margin {min(margins)} < {MIN_MARGIN}: pick another prompt"

    # Columns: every row's argmax (padding suppressed and not), all pad/special edges, random fill.
    vocab = next(iter(full.values())).shape[1]
    must = {0, 1, PAD_START - 1, PAD_START, PAD_START + 1, vocab - 1, *range(49152, 49157)}
    must |= set(np.random.default_rng([SEED, 7]).choice(np.arange(PAD_START, vocab), 14, replace=False).tolist())
    for logits in full.values():
        must |= set(np.argmax(logits, axis=1).tolist())
        masked = logits.copy()
        masked[:, PAD_START:] = -np.inf
        must |= set(np.argmax(masked, axis=1).tolist())
    rest = np.setdiff1d(np.arange(vocab), np.array(sorted(must)))
    fill = np.random.default_rng([SEED, 11]).choice(rest, N_COLUMNS - len(must), replace=False)
    columns = np.sort(np.concatenate([np.array(sorted(must)), fill])).astype(np.int64)
    assert len(columns) == N_COLUMNS and len(np.unique(columns)) == N_COLUMNS
    out["columns"] = columns
    for (variant, name), logits in full.items():
        # The last position is saved whole in `.last`; repeating it here would only cost bytes.
        out[f"{variant}.{name}.logits"] = np.ascontiguousarray(logits[:-1, columns], dtype=np.float32)

    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_npz(OUT, out)
    print(f"columns: {N_COLUMNS} ({int((columns >= PAD_START).sum())} padding rows)")
    print(f"min greedy margin over all: {min(margins_all):.4f}")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    assert OUT.stat().st_size < MAX_BYTES, f"{OUT} is over {MAX_BYTES} bytes: use fewer columns"


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):  # no parser: print what it does, before it writes or runs anything
        sys.exit(print(__doc__.strip()))
    main()
