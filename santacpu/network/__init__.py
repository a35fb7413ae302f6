"""The network: SantaCoder's tensors in one canonical layout (`weights`), the plain-NumPy fp32
oracle (`reference`), the KV cache (`kv_cache`) and the incremental forward pass over a backend
(`engine`). Everything here follows from a `Config`; nothing here reads files or tokens' text.

May import: `santacpu.backends`, `santacpu.formats` and the foundation modules.
"""
