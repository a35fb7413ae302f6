"""santacpu's offline converter and quantized block formats (int8/int4).

Empty for now: the foundation (exact fp32 loading and forward) lives in `santacpu`; the converter
from full-precision checkpoints to one self-contained block-quantized file will live here.
"""
