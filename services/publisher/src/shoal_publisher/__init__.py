"""shoal_publisher."""
