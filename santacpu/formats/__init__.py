"""What the bytes mean, in NumPy only: the block formats (q8_0, q4_0, q4_m, q6_0) with their
layout tables and plain-NumPy quantize / dequantize twins (`blocks`), a matrix whose rows are in
two of them (`split_rows`: the embedding's most used rows at q8_0), santacpu's quantized file
(format name, version, metadata; `quantized_file`), and the tensor-file readers and writer
(`safetensors_io`, `torch_zip`). Knows nothing of networks, kernels or models.

May import: numpy, `santacpu.errors`, `santacpu.config`, `santacpu.atomic_file`; nothing else of santacpu.
"""
