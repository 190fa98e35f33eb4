"""shoal_common."""
