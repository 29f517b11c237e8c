"""proxy subsystem."""
