"""The output error a weight error causes on the calibration inputs, row by row."""

import numpy as np


def row_output_errors(delta: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """``(delta H delta^T)_ii`` for each row ``i`` of a weight error ``delta``, summed in float64."""
    return np.einsum("ij,ij->i", delta @ hessian, delta, dtype=np.float64)
