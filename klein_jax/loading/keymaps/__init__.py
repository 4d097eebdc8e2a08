"""Key-map tables: published checkpoint tensor names -> Flax parameter paths (one module per component)."""
