"""How the affine modules of a plan get their codes (``convert --quantizer``): each
quantizer is a strategy, ``codes(weight, inputs, choice, clip)`` for one calibrated
module, and a row of ``QUANTIZERS``, which also writes the flag's help. A new one is a
class (or an instance of one below) and a row."""

from dataclasses import dataclass

import mlx.core as mx

from lsaq_mlx.gptq.codes import affine_codes
from lsaq_mlx.gptq.solver import AffineCodes, ModuleInputs
from lsaq_mlx.planning.choices import Affine


@dataclass(frozen=True)
class Quantizer:
    """Round to nearest (``mx.quantize``, as mlx_lm.convert); with ``clip``, each group's
    range is first clipped where that lowers its output error on the calibration inputs."""

    name: str
    help: str
    equalize: bool = False  # AWQ-style input scales searched and folded into the layer first (``equalization``)
    uses_hessian = False  # codes() reads the module's input Hessian: the LM head is calibrated too

    @property
    def calibrated(self) -> bool:
        """Whether it reads calibration text (one streamed pass, a layer at a time)."""
        return self.equalize or self.uses_hessian

    def codes(self, weight: mx.array, inputs: ModuleInputs, choice: Affine, clip: bool) -> AffineCodes:
        return affine_codes(weight, None, choice, inputs.hessian if clip else None)


@dataclass(frozen=True)
class Gptq(Quantizer):
    """GPTQ with the module's input Hessian; ``refit``: then each row's scales and
    biases refitted to its codes (``gptq.refit``)."""

    refit: bool = False
    uses_hessian = True

    def codes(self, weight: mx.array, inputs: ModuleInputs, choice: Affine, clip: bool) -> AffineCodes:
        return affine_codes(weight, inputs.factor, choice, inputs.hessian if clip else None,
                            inputs.hessian if self.refit else None)


QUANTIZERS = {q.name: q for q in (
    Quantizer("rtn", "round to nearest, as mlx_lm.convert"),
    Gptq("gptq", "each column's rounding error compensated in the later columns with the module's input Hessian"),
    Quantizer("awq", "per input channel scales searched on calibration activations, folded into the preceding "
                     "norm or up_proj, each group's range clipped where that lowers its output error, then round "
                     "to nearest", equalize=True),
    Gptq("awq-gptq", "awq's scales, then GPTQ", equalize=True),
    Gptq("awq-gptq-refit", "awq-gptq, then each row's scales and biases refitted to its GPTQ codes by least "
                           "squares on the calibration inputs: better at 3.5 bits per weight, not at 4.6",
         equalize=True, refit=True),
)}


AUTO = "auto"
CALIBRATED = "awq-gptq"  # what auto picks when the machine can afford it: the best measured
AFFORDABLE_SECONDS = 600
# awq-gptq's work per planned weight and calibration token, in float32 GEMM operations:
# its measured seconds x gemm_gflops(1024) / (planned weights x 16,384 tokens). SmolLM2-135M
# at 4.0 bits per weight on a 2-core x86 CPU: 910 s for 134.5 M weights at 38 GFLOP/s,
# 15.7; the 2-layer Llama-3-8B shape's 2,245 s (1.49 B weights) gives 15 at 150 GFLOP/s.
CALIBRATION_OPS_PER_WEIGHT_TOKEN = 16.0


@dataclass(frozen=True)
class QuantizerChoice:
    """What ``--quantizer auto`` decided, and why (one line for the user)."""

    name: str
    calibrated_seconds: float  # awq-gptq's estimated time on this machine

    def reason(self) -> str:
        minutes = self.calibrated_seconds / 60
        if self.name == CALIBRATED:
            return (f"quantizer: {CALIBRATED} (the best measured; about {minutes:.0f} min here, "
                    f"--quantizer rtn takes seconds)")
        return (f"quantizer: rtn ({CALIBRATED} would take about {minutes:.0f} min here, over "
                f"{AFFORDABLE_SECONDS // 60} min; --quantizer {CALIBRATED} to spend it for a lower error)")


def calibrated_seconds(weights: int, gemm_gflops: float, tokens: int) -> float:
    """awq-gptq's estimated wall time for a plan of ``weights`` on a machine whose float32
    GEMM runs at ``gemm_gflops``."""
    return CALIBRATION_OPS_PER_WEIGHT_TOKEN * weights * tokens / (gemm_gflops * 1e9)


def choose_quantizer(weights: int, gemm_gflops: float, tokens: int) -> QuantizerChoice:
    """``auto``: awq-gptq when its estimated time is at most ``AFFORDABLE_SECONDS``, else rtn."""
    seconds = calibrated_seconds(weights, gemm_gflops, tokens)
    return QuantizerChoice(CALIBRATED if seconds <= AFFORDABLE_SECONDS else "rtn", seconds)


def quantizer_help() -> str:
    """The ``--quantizer`` help: every row of ``QUANTIZERS``."""
    rows = "; ".join(f"{q.name} ({q.help})" for q in QUANTIZERS.values())
    return (f"How affine modules get their codes: {AUTO} (the default, or LSAQ_MLX_QUANTIZER: {CALIBRATED} where its "
            f"time estimated from this machine's float32 GEMM rate is at most {AFFORDABLE_SECONDS // 60} min, else rtn; "
            f"the choice is printed); {rows}. The calibrated ones read 16,384 tokens of --calib text a "
            "decoder layer at a time (2,048 more are held out: each row keeps rtn's codes where they do better on "
            "them, and each decoder layer is written as rtn writes it where that changes its output less); with GPTQ an embedding tied to the LM head goes through GPTQ as the head up to 5 bits; other "
            "embeddings stay rtn. The plan is the same either way; the output is a stock mlx-lm folder. Measured on a "
            "2-core x86 CPU (MLX's CPU backend, not Apple silicon): on SmolLM2-135M awq-gptq's KL to the source is "
            "0.64x rtn's at 4.0 bits per weight and 0.88x at 6.0, and it took 910 s against 3 s (the CPU's GEMM at "
            "38 GFLOP/s); a 2-layer Llama-3-8B-shaped model took 2,245 s, so a whole 8B model would take about 15 h "
            "there: auto picks rtn for it and prints the estimate.")
