"""modeling_segcompass (being assembled)."""
