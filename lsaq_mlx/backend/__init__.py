"""How models run on this machine: the BLAS behind MLX's CPU backend, the compute mode,
work spread over the cores, attention on the CPU, and mlx.launch ranks."""
