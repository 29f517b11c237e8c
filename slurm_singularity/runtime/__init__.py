"""runtime subsystem."""
