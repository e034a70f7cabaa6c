"""Triton kernels of pyseqpack, installed as ``pyseqpack.kernels``.

One file per op: the kernel, its launcher, and a docstring giving every argument's shape and dtype.
Importing this package does not import triton; each op module does.
"""
