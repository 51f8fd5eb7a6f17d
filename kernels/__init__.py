"""Triton kernels: @triton.jit functions and their launch helpers."""
