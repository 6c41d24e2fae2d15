"""Activation-aware equalization (in the spirit of AWQ, Lin et al. 2023): per input
channel scales ``s`` that a linear module's columns are multiplied by before
quantization, with ``1/s`` folded into whatever produced its input (an RMSNorm's
weight, or the rows of ``up_proj`` for ``down_proj``), so the float model computes
the same function and the written folder is still stock mlx-lm.

``groups`` says which modules share an input and where its scales fold, and folds
them; ``search`` picks each group's scales from the modules' input Hessians;
``clipping`` shrinks each quantization group's range where that lowers its error
(before round to nearest; GPTQ compensates instead).
"""
