"""Training: optimizer, train state, jit-compiled steps, checkpoints, metrics and the loop.

Imports Orbax, Grain and TensorStore; ``import jaxbased`` alone does not load this package.
"""
