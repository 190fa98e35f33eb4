"""shoal_verifier."""
