"""Sequence mixers: each maps `[B, T, dim] -> [B, T, dim]` causally. The yaml in conf/attention/ is the registration."""
