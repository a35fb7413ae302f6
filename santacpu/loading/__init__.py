"""From a name to `ModelWeights`: model sources (folder, file, hub id; `source`), full-precision
checkpoints in either layout (`checkpoint`), santacpu's quantized files (`quantized`), and random
SantaCoder-shaped checkpoints for tests and benchmarks (`random_checkpoint`).

May import: `santacpu.network`, `santacpu.backends`, `santacpu.formats` and the foundation modules;
never `santacpu.generation` or the API above.
"""
