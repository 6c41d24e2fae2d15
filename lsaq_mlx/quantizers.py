"""How the affine modules of a plan get their codes (``convert --quantizer``)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Quantizer:
    name: str
    equalize: bool  # AWQ-style input scales searched and folded first (``equalization``); clipping without GPTQ
    compensate: bool  # GPTQ rather than round to nearest (``gptq``)
    help: str
    refit: bool = False  # GPTQ's scales and biases refitted to its codes (``gptq.refit``)

    @property
    def calibrated(self) -> bool:
        """Whether it reads calibration text (one streamed pass, a layer at a time)."""
        return self.equalize or self.compensate


QUANTIZERS = {q.name: q for q in (
    Quantizer("rtn", False, False, "round to nearest: each group's codes, scale and bias from the weights alone "
                                   "(mlx_lm.convert's)"),
    Quantizer("gptq", False, True, "GPTQ: columns taken largest input first, each one's rounding error compensated "
                                   "in the columns not yet quantized, using the module's input Hessian on calibration "
                                   "text; each layer is calibrated on what the quantized layers before it compute "
                                   "(linear modules, and an embedding tied to the LM head as the head; other embeddings stay round to nearest)"),
    Quantizer("awq", True, False, "activation-aware equalization, then round to nearest: per input channel scales "
                                  "searched on calibration text, folded into the norm or up_proj before the module, "
                                  "and each group's range clipped where that lowers its output error"),
    Quantizer("awq-gptq", True, True, "equalization as awq, then GPTQ on the equalized weights, each group's range "
                                      "clipped before GPTQ (not q_proj, k_proj)"),
    Quantizer("awq-gptq-refit", True, True, "awq-gptq, then each row's scales and biases refitted to its GPTQ codes: "
                                            "the least-squares minimum of its output error on the calibration inputs",
              refit=True),
)}
