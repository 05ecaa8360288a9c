"""Built-in samplers: ancestral, confidence/threshold remasking, semi-AR, speculative, AR."""
