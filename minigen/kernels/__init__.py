"""Triton kernels, one op per file. Each file holds `_<op>_kernel` (@triton.jit), the launcher
`<op>(...)` (check shapes -> allocate or take `out=` -> launch) and `<op>_ref(...)` in plain torch
with the same signature; minigen/kernels/ops.py picks one or the other per device, launch.py holds
what the launchers share, and split_k.py what the two split-K attention kernels (decode_attention,
sparse_attention) share. Measurements behind the kernels' choices: docs/kernels.md."""
