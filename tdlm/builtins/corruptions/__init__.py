"""Built-in corruption processes: uniform, state-dependent, CART."""
