"""Parallax attention: one public entry point per operation, with a backend switch (``impl``)."""

from kernels.parallax.reference import parallax_attention

__all__ = ["parallax_attention"]
