"""Hardware kernels (docs/architecture.md, layer 1): pure functions on arrays, no Flax, no
jaxbased imports.

One folder per op, each with a Mosaic TPU kernel (``tpu.py``), a GPU kernel (``gpu.py``, Pallas'
Triton lowering; see ``_common.py`` for why not Mosaic GPU), the math both share, and an
``__init__.py`` exposing the op with its ``jax.custom_vjp`` (forward and backward kernels) and
an ``interpret`` switch that runs it on CPU:

- :func:`pallas_kernels.linear_attention.linear_attention`: causal chunked linear attention with
  the feature map fused (Taylor, elu, relu, identity; the features and the float32 state stay
  on chip), queries and keys optionally shared by groups of heads, optional initial state,
  final state returned, optional decay per step and head (``log_decay``, differentiable) and an
  unnormalized variant (``normalize=False``).
- :func:`pallas_kernels.window_attention.window_attention`: flash-style causal softmax over a
  sliding window (or full causal), key blocks outside the window skipped.
- :func:`pallas_kernels.selective_scan.selective_scan`: Mamba-1's selective scan, the state of
  a block of channels on chip for the whole sequence, a checkpoint per chunk for the backward.

``jaxbased.ops`` dispatches to these (``implementation="auto" | "xla" | "pallas"``). The
subpackages are imported explicitly (their names are also the names of their functions).
"""
