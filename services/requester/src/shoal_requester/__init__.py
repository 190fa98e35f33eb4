"""shoal_requester."""
