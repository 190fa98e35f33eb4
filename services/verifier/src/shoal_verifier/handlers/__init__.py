"""Bus consumers: decode the envelope, hand the typed event to the coordinator."""
