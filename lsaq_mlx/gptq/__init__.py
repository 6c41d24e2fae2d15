"""GPTQ: affine quantization that compensates each column's rounding error in the
columns not yet quantized, using the module's input Hessian ``H = X^T X``.

``packing`` writes integer codes in MLX's packed layout, ``solver`` quantizes one
matrix given its Hessian, ``streamed`` collects every module's Hessian in one pass of
calibration text through the model, a decoder layer at a time, and writes the quantized
modules of each layer while it is in memory.
"""
