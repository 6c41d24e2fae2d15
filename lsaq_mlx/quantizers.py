"""How the affine modules of a plan get their codes (``convert --quantizer``)."""

QUANTIZERS = {
    "rtn": "round to nearest: each group's codes, scale and bias from the weights alone (mlx_lm.convert's)",
    "gptq": "GPTQ: each column's rounding error compensated in the columns after it, using the module's "
            "input Hessian on calibration text (linear modules; embeddings stay round to nearest)",
}
