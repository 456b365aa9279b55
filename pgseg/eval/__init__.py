"""Zero-shot evaluation: inference rules (and, later, readers, metrics and visualisation)."""
