"""GPTQ: affine quantization that compensates each column's rounding error in the
columns not yet quantized, using the module's input Hessian ``H = X^T X``.

``packing`` writes integer codes in MLX's packed layout, ``solver`` quantizes one
matrix given its Hessian, ``hessians`` collects every module's Hessian in one pass of
calibration text through the model a decoder layer at a time, ``writer`` quantizes a
plan's modules with them, and ``pricing`` measures how much GPTQ lowers each
candidate's error, so that the planner can price choices as GPTQ will write them.
"""
