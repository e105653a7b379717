"""Hardware kernels (DESIGN.md layer 1): pure functions on arrays, no Flax, no jaxbased imports.

One folder per op (``linear_attention/``, ``window_attention/``), each with a Mosaic TPU kernel, a
GPU kernel and a ``custom_vjp``. The kernels arrive with the Pallas issue; until then
``jaxbased.ops`` runs its XLA reference implementations on every platform.
"""
