"""shoal_client."""
