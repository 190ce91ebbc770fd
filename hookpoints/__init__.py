"""hookpoints."""
