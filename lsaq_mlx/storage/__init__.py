"""Compressed storage: lossless codecs and byte transforms, the container file format,
model packs (``lsaq-mlx pack``), and the layer store the runtime swaps from."""
