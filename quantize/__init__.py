"""santacpu's offline converter: full-precision checkpoint -> one self-contained block-quantized
file (`converter`), the per-tensor policy (`policy`), importance statistics for calibration
(`calibration`), `santacpu quantize`'s pipeline (`pipeline`), and the first-use quantization
cache (`cache`). The block formats themselves are the runtime's: `santacpu.formats.blocks`.

May import: `santacpu`'s layers below the API (`santacpu.model` imports `quantize.cache` for first-use
quantization; `santacpu.cli` runs `santacpu quantize` and `santacpu cache`).
"""

# `santacpu quantize --calibration-tokens`' default, and first use's (here, so that the command line
# states it without loading the converter).
DEFAULT_CALIBRATION_TOKENS = 4096
