"""Model classes transformers does not ship (registered with its Auto classes on import)."""
