"""Triton kernels of fdino, installed as ``fdino.kernels``."""
