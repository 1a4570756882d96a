"""linjax.verify (see DESIGN.md). Public names are re-exported here as they land."""
