"""linjax.kernels_pallas (see DESIGN.md). Public names are re-exported here as they land."""
