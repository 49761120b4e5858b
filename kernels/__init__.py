"""Triton kernels of fdino, installed as ``fdino.kernels``.

- ``fdino.kernels.dino_loss``: the fused DINO loss (centered teacher softmax, student
  log-softmax and cross-entropy over all crop pairs, with its backward and the batch center);
  ``fdino.loss.dino_loss(..., impl="triton")`` calls it. Importing it imports Triton.
"""
