"""``lsaq-mlx tui``: a Textual app on the runtime engine: memory, the layer plan, chat,
and live precision swaps."""
