"""Train a tiny SantaCoder-architecture model on the Python standard library (dev tool: torch + transformers).

Quantization error measured on random weights says little about trained ones, so the quantization
accuracy tests and the llama.cpp comparison use a small *trained* model: this script makes it.

Model: `GPTBigCodeForCausalLM`, multi-query attention, gelu_pytorch_tanh, the real 49280-row
vocabulary (the bundled SantaCoder tokenizer), 256 positions, n_embd 128, 4 heads, 4 layers,
n_inner 512, no dropout, tied embedding (~7 M parameters, mostly the embedding).

Data: the running interpreter's stdlib `*.py` files (no test folders, site-packages, idlelib,
tkinter), each followed by `<|endoftext|>` (49152), in one token stream. A fixed set of files,
picked by a seeded hash of their path relative to the stdlib root, is held out: never trained on,
listed in `heldout.txt` and copied, concatenated, into `heldout.py.txt` (so tests do not depend on
this interpreter's stdlib).

Objective: next-token prediction on 257-token windows (256 inputs, 256 targets) at random offsets of
the stream. With probability 0.5 a window becomes a fill-in-the-middle example: each of its
document segments (split at `<|endoftext|>`) is cut at two uniform random token positions into
prefix/middle/suffix and emitted, from token ids, in PSM order
`<fim-prefix> prefix <fim-suffix> suffix <fim-middle> middle <|endoftext|>` or SPM order
`<fim-prefix> <fim-suffix> suffix <fim-middle> prefix middle <|endoftext|>` (half each); the
segment's tail is trimmed by the sentinels' length so the window keeps its length (no padding).
Padding-row ids (>= 49157) never occur in the data.

Training: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak lr 1e-3, linear warmup then
cosine decay to 10% of peak over the wall-clock budget (the schedule follows elapsed time, since the
number of steps a budget buys depends on the machine), batch 16 x 256 tokens, gradient clipping 1.0,
2 threads, fp32. Seeded; the wall-clock cutoff makes the exact bits non-reproducible, so the number of
steps done is recorded in TRAINING.md.

    nice -n 19 python -m tools.train_tiny [--minutes 30] [--out tests/fixtures/trained_tiny]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools import random_checkpoint  # noqa: E402

TOKENIZER_JSON = REPO / "santacpu" / "data" / "tokenizer.json"

EOS, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = 49152, 49153, 49154, 49155
FIRST_PADDING_ROW = 49157

SIZE = "trained"  # random_checkpoint.SIZES' name of the shapes (--size)
EXCLUDED_DIRS = {"test", "tests", "site-packages", "idlelib", "tkinter", "__pycache__"}
HELDOUT_FILES = 20
HELDOUT_MIN_BYTES, HELDOUT_MAX_BYTES = 4_000, 30_000  # skip trivial and huge files when picking


def config_json() -> dict:
    """config.json in the gpt_bigcode layout, spelled as tools/random_checkpoint does."""
    return dict(random_checkpoint.config_json(SIZE, "gpt_bigcode"), tie_word_embeddings=True)


# ----------------------------------------------------------------------------------------- data


class PlainTokenizer:
    """The bundled SantaCoder tokenizer as santacpu.tokenizer encodes with it: added tokens removed,
    so special-token strings in text stay text; specials are placed by id. (Read directly with the
    `tokenizers` library so this tool does not import the santacpu package.)"""

    def __init__(self, path: Path = TOKENIZER_JSON):
        import tokenizers

        spec = json.loads(path.read_text(encoding="utf-8"))
        added = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
        assert added["<|endoftext|>"] == EOS and added["<fim-prefix>"] == FIM_PREFIX
        assert added["<fim-middle>"] == FIM_MIDDLE and added["<fim-suffix>"] == FIM_SUFFIX
        self._plain = tokenizers.Tokenizer.from_str(json.dumps(dict(spec, added_tokens=[])))

    def encode(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._plain.decode(list(ids), skip_special_tokens=False)


def stdlib_files(root: Path) -> list[str]:
    """Relative paths (posix) of the stdlib's *.py files, minus excluded folders, sorted."""
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        out.append(rel.as_posix())
    return sorted(out)


def pick_heldout(root: Path, files: list[str], seed: int) -> list[str]:
    """A fixed set: files in order of sha256(f"{seed}:{path}"), size-filtered, first HELDOUT_FILES."""
    ranked = sorted(files, key=lambda rel: hashlib.sha256(f"{seed}:{rel}".encode()).hexdigest())
    chosen = []
    for rel in ranked:
        if HELDOUT_MIN_BYTES <= (root / rel).stat().st_size <= HELDOUT_MAX_BYTES:
            chosen.append(rel)
            if len(chosen) == HELDOUT_FILES:
                break
    return sorted(chosen)


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def heldout_text(root: Path, heldout: list[str]) -> str:
    """The held-out files concatenated, each after a `# heldout: PATH` line (a Python comment)."""
    parts = []
    for rel in heldout:
        text = read_text(root / rel) or ""
        if not text.endswith("\n"):
            text += "\n"
        parts.append(f"# heldout: {rel}\n{text}")
    return "".join(parts)


def token_stream(tokenizer: PlainTokenizer, texts: list[str]) -> np.ndarray:
    """Each text's ids followed by EOS, all in one int64 array."""
    chunks = []
    for text in texts:
        chunks.append(np.asarray(tokenizer.encode(text), dtype=np.int64))
        chunks.append(np.asarray([EOS], dtype=np.int64))
    stream = np.concatenate(chunks)
    assert stream.max() < FIRST_PADDING_ROW
    return stream


def fim_segment(seg: np.ndarray, m: int, rng: random.Random) -> np.ndarray:
    """First m tokens of seg as a FIM example (PSM or SPM, half each), ending with EOS: m + 4 tokens."""
    body = seg[:m]
    a, b = sorted((rng.randint(0, m), rng.randint(0, m)))
    prefix, middle, suffix = body[:a], body[a:b], body[b:]
    if rng.random() < 0.5:  # PSM
        parts = [[FIM_PREFIX], prefix, [FIM_SUFFIX], suffix, [FIM_MIDDLE], middle, [EOS]]
    else:  # SPM
        parts = [[FIM_PREFIX, FIM_SUFFIX], suffix, [FIM_MIDDLE], prefix, middle, [EOS]]
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


def fim_window(window: np.ndarray, rng: random.Random, min_tokens: int = 8) -> np.ndarray:
    """Turn each document segment of a window into a FIM example, keeping the window's length.

    A segment followed by an EOS in the window has n + 1 slots; its FIM form (m + 4 tokens, EOS
    included) then uses m = n - 3 of its tokens. The last segment has n slots: m = n - 4. The
    tokens dropped are the segment's tail (the suffix is what gets trimmed)."""
    ends = list(np.flatnonzero(window == EOS))
    out, start = [], 0
    for end in [*ends, len(window)]:
        seg = window[start:end]
        last = end == len(window)
        m = len(seg) - (4 if last else 3)
        if m >= min_tokens:
            out.append(fim_segment(seg, m, rng))
        else:
            out.append(seg if last else window[start:end + 1])
        start = end + 1
    result = np.concatenate(out)
    assert len(result) == len(window), (len(result), len(window))
    return result


class Batches:
    """Random 257-token windows of the training stream, half of them FIM, seeded."""

    def __init__(self, stream: np.ndarray, batch: int, seq: int, fim_rate: float, seed: int):
        self.stream, self.batch, self.seq, self.fim_rate = stream, batch, seq, fim_rate
        self.rng = random.Random(seed)

    def next(self) -> torch.Tensor:
        rows = []
        for _ in range(self.batch):
            start = self.rng.randrange(0, len(self.stream) - self.seq - 1)
            window = self.stream[start:start + self.seq + 1]
            if self.rng.random() < self.fim_rate:
                window = fim_window(window, self.rng)
            rows.append(window)
        return torch.from_numpy(np.stack(rows))


# ---------------------------------------------------------------------------------------- model


def make_model(seed: int):
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    torch.manual_seed(seed)
    config = GPTBigCodeConfig(**{k: v for k, v in config_json().items() if k not in ("model_type", "architectures")})
    model = GPTBigCodeForCausalLM(config)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "embedding not tied"
    return model


def lm_loss(model, ids: torch.Tensor, autocast: bool) -> torch.Tensor:
    """Mean next-token cross-entropy of ids[:, :-1] -> ids[:, 1:] (vocab rows >= 49157 included)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hidden = model.transformer(input_ids=ids[:, :-1]).last_hidden_state
        logits = model.lm_head(hidden)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(model, ids: np.ndarray, seq: int = 256) -> tuple[float, int]:
    """fp32 mean NLL over non-overlapping `seq`-token windows (each predicts its seq - 1 next tokens)."""
    model.eval()
    total, count = 0.0, 0
    n = len(ids) // seq
    windows = torch.from_numpy(ids[: n * seq].reshape(n, seq))
    for i in range(0, n, 8):
        batch = windows[i:i + 8]
        logits = model(input_ids=batch).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    model.train()
    return total / count, count


@torch.no_grad()
def heldout_fim_loss(model, ids: np.ndarray, seed: int, n: int = 64, seq: int = 256) -> float:
    """fp32 mean NLL of the middle tokens + closing EOS of `n` deterministic PSM examples cut from
    the held-out stream (windows of `seq` tokens)."""
    model.eval()
    rng = random.Random(seed)
    total, count = 0.0, 0
    for _ in range(n):
        start = rng.randrange(0, len(ids) - seq)
        body = ids[start:start + seq - 4]
        a = rng.randint(0, len(body) - 32)
        b = a + rng.randint(1, 32)
        row = np.concatenate([[FIM_PREFIX], body[:a], [FIM_SUFFIX], body[b:], [FIM_MIDDLE], body[a:b], [EOS]])
        x = torch.from_numpy(row.astype(np.int64))[None]
        logits = model(input_ids=x).logits.float()[0]
        first = len(row) - (b - a) - 1  # position of the first middle token
        nll = F.cross_entropy(logits[first - 1:-1], x[0, first:], reduction="sum")
        total += nll.item()
        count += len(row) - first
    model.train()
    return total / count


def save_fixture(model, out: Path) -> None:
    half = make_model(0)
    half.load_state_dict(model.state_dict())
    half = half.half()
    half.save_pretrained(out, safe_serialization=True)
    # transformers writes its own config.json; replace it with the project's spelling.
    (out / "config.json").write_text(json.dumps(config_json(), indent=2) + "\n")
    for extra in ("generation_config.json",):
        if (out / extra).exists():
            (out / extra).unlink()


def fp16_model_fp32(out: Path):
    """The saved fp16 checkpoint, loaded by transformers and upcast to fp32 (the reference)."""
    from transformers import GPTBigCodeForCausalLM

    return GPTBigCodeForCausalLM.from_pretrained(out, torch_dtype=torch.float16).float().eval()


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "tests" / "fixtures" / "trained_tiny"))
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock training budget")
    parser.add_argument("--size", default="trained", choices=("trained", "trained_wide", "trained_deep"),
                        help="the shapes (tools/random_checkpoint.SIZES): trained (tests/fixtures/trained_tiny), "
                        "trained_wide (tests/fixtures/trained_wide: n_embd 256, 8 heads, n_inner 1024) or trained_deep "
                        "(tests/fixtures/trained_deep: trained_wide's width, 12 layers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    parser.add_argument("--fim-rate", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                        help="bfloat16 autocast for forward/backward (slower than fp32 on the 2-core build machine)")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--ckpt-every-min", type=float, default=5.0)
    parser.add_argument("--work-dir", default="/tmp/train_tiny", help="periodic checkpoints (last.pt)")
    parser.add_argument("--resume", action="store_true", help="continue from WORK_DIR/last.pt")
    args = parser.parse_args(argv)
    global SIZE
    SIZE = args.size

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    out, work = Path(args.out), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    # Data.
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    heldout = pick_heldout(root, files, args.seed)
    held = set(heldout)
    train_texts = [t for rel in files if rel not in held and (t := read_text(root / rel))]
    held_text = heldout_text(root, heldout)
    (out / "heldout.txt").write_text("".join(f"{rel}\n" for rel in heldout))
    (out / "heldout.py.txt").write_text(held_text, encoding="utf-8")
    tokenizer = PlainTokenizer()
    stream = token_stream(tokenizer, train_texts)
    held_ids = np.asarray(tokenizer.encode(held_text), dtype=np.int64)
    print(f"stdlib {root} (Python {platform.python_version()}): {len(files)} files, {len(heldout)} held out "
          f"({len(held_text.encode()):,} bytes, {len(held_ids):,} tokens); train stream {len(stream):,} tokens "
          f"[{time.time() - t_start:.0f}s]", flush=True)

    # Model and optimizer.
    model = make_model(args.seed)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "wte" not in n and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "wte" not in n and "wpe" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    batches = Batches(stream, args.batch, args.seq, args.fim_rate, args.seed)
    step, trained_s = 0, 0.0
    if args.resume and (work / "last.pt").exists():
        state = torch.load(work / "last.pt", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        batches.rng.setstate(state["rng"])
        step, trained_s = state["step"], state["trained_s"]
        print(f"resumed at step {step} ({trained_s / 60:.1f} min trained)", flush=True)
    print(f"model: {n_params:,} parameters; batch {args.batch} x {args.seq}; budget {args.minutes} min; "
          f"bf16 autocast {args.bf16}; threads {torch.get_num_threads()}", flush=True)

    budget = args.minutes * 60.0
    t0 = time.time() - trained_s
    last_ckpt = time.time()
    window_loss, window_n, recent = 0.0, 0, []
    while (elapsed := time.time() - t0) < budget:
        progress = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        ids = batches.next()
        loss = lm_loss(model, ids, args.bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        window_loss += loss.item()
        window_n += 1
        recent = (recent + [loss.item()])[-50:]
        if step % args.log_every == 0 or step == 1:
            print(f"step {step:6d}  loss {window_loss / window_n:.4f}  lr {lr:.2e}  "
                  f"{elapsed / 60:.1f} min  {elapsed / step:.2f} s/step", flush=True)
            window_loss, window_n = 0.0, 0
        if time.time() - last_ckpt > args.ckpt_every_min * 60:
            torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), rng=batches.rng.getstate(),
                            step=step, trained_s=time.time() - t0), work / "last.pt")
            last_ckpt = time.time()
    train_s = time.time() - t0
    final_train = sum(recent) / max(1, len(recent))
    print(f"done: {step} steps in {train_s / 60:.1f} min; train loss (mean of last {len(recent)} steps) "
          f"{final_train:.4f}", flush=True)

    # Save and measure the saved fp16 checkpoint in fp32.
    save_fixture(model, out)
    ref = fp16_model_fp32(out)
    h_loss, h_tokens = heldout_loss(ref, held_ids, args.seq)
    fim = heldout_fim_loss(ref, held_ids, args.seed)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"held-out: loss {h_loss:.4f}, perplexity {math.exp(h_loss):.2f} over {h_tokens:,} predicted tokens; "
          f"FIM middle loss {fim:.4f}; fixture {size / 1e6:.2f} MB", flush=True)

    command = "nice -n 19 python -m tools.train_tiny " + " ".join(argv if argv is not None else sys.argv[1:])
    write_training_md(out, args, command.strip(), dict(
        python=platform.python_version(), torch=torch.__version__, files=len(files), heldout=len(heldout),
        held_bytes=len(held_text.encode()), held_tokens=len(held_ids), train_tokens=len(stream),
        params=n_params, steps=step, train_min=train_s / 60, final_train=final_train, h_loss=h_loss,
        h_tokens=h_tokens, fim=fim, size=size,
    ))
    if work.exists() and (work / "last.pt").exists():
        (work / "last.pt").unlink()


def write_training_md(out: Path, args, command: str, r: dict) -> None:
    import transformers

    m = random_checkpoint.SIZES[SIZE]
    text = f"""# {out.name}: how it was made

A small SantaCoder-architecture model trained on the Python standard library, for quantization
accuracy tests and the llama.cpp comparison (random weights say little about trained ones).
Made by `tools/train_tiny.py` (its docstring holds the full recipe).

Command (repo root): `{command}`

Environment: Python {r['python']} (its stdlib is the data), torch {r['torch']}, transformers
{transformers.__version__}, {torch.get_num_threads()} CPU threads, bf16 autocast {args.bf16}.

## Recipe

- Model: `GPTBigCodeForCausalLM`, multi_query, gelu_pytorch_tanh, vocab {m['vocab_size']} (bundled
  SantaCoder tokenizer), n_positions {m['n_positions']}, n_embd {m['n_embd']}, n_head {m['n_head']}
  (head_dim {m['n_embd'] // m['n_head']}), n_layer {m['n_layer']}, n_inner {m['n_inner']}, dropout 0, tied
  embedding: {r['params']:,} parameters. Init: transformers' default (std 0.02), `torch.manual_seed({args.seed})`.
- Data: {r['files']} stdlib `*.py` files (excluding test/tests, site-packages, idlelib, tkinter
  folders); {r['heldout']} held out (the first {r['heldout']} files of {HELDOUT_MIN_BYTES}-{HELDOUT_MAX_BYTES} bytes
  in order of sha256("{args.seed}:" + path)), listed in `heldout.txt`, never trained on. The rest,
  each followed by `<|endoftext|>` (49152), form a stream of {r['train_tokens']:,} tokens.
- `heldout.py.txt`: the held-out files concatenated in `heldout.txt` order, each preceded by a
  `# heldout: PATH` line ({r['held_bytes']:,} bytes, {r['held_tokens']:,} tokens).
- Objective: next-token cross-entropy on random {args.seq + 1}-token windows ({args.seq} inputs);
  with probability {args.fim_rate} a window becomes FIM: each document segment is cut at two
  uniform random token positions and emitted in PSM
  (`<fim-prefix> P <fim-suffix> S <fim-middle> M <|endoftext|>`) or SPM
  (`<fim-prefix> <fim-suffix> S <fim-middle> P M <|endoftext|>`) order, half each; the
  segment's tail is trimmed so the window keeps its length. No ids >= 49157 in the data.
- Optimizer: AdamW (0.9, 0.95), weight decay 0.1 on matrices (not embeddings, biases, LayerNorms),
  peak lr {args.lr}, {args.warmup}-step linear warmup, cosine decay to 10% over the wall-clock budget,
  gradient clipping 1.0, batch {args.batch} x {args.seq} tokens, seed {args.seed}.
- Budget {args.minutes} min wall clock: **{r['steps']} steps** done in {r['train_min']:.1f} min
  ({r['steps'] * args.batch * args.seq:,} tokens). The cutoff is by time, so reruns differ in bits.

## Results

- Final train loss (mean of the last 50 steps, FIM examples mixed in): {r['final_train']:.4f}
- Held-out loss, transformers fp32 on the saved fp16 weights, `heldout.py.txt` in non-overlapping
  {args.seq}-token windows ({r['h_tokens']:,} predicted tokens): **{r['h_loss']:.4f} nats/token,
  perplexity {math.exp(r['h_loss']):.2f}**
- Held-out FIM (64 deterministic PSM examples, 1-32-token middles, loss on middle + EOS):
  {r['fim']:.4f} nats/token

## Files

- `model.safetensors`: fp16, gpt_bigcode layout (`transformer.wte.weight`, no `lm_head.weight`)
- `config.json`: gpt_bigcode config (as `tools/random_checkpoint.config_json` spells it)
- `heldout.txt`, `heldout.py.txt`: see above
- no `tokenizer.json`: it is the bundled `santacpu/data/tokenizer.json`, which santacpu falls back to

Fixture size: {r['size'] / 1e6:.2f} MB.
"""
    (out / "TRAINING.md").write_text(text)


if __name__ == "__main__":
    main()
