"""Parallax compute: PyTorch references and the kernels checked against them."""
