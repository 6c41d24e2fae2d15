"""SWSC: shared weights for similar channels with SVD error compensation, a per-module codec.

``codec`` compresses a matrix (``kmeans``, ``lowrank``) and counts its bytes,
``candidates`` lists the settings the planner weighs against affine bit widths,
``layer`` computes with the compressed form, ``format`` writes and reads it in a model folder.
"""

from lsaq_mlx.swsc.codec import SWSCSettings, SWSCWeights, compress, is_swsc

__all__ = ["SWSCSettings", "SWSCWeights", "compress", "is_swsc"]
