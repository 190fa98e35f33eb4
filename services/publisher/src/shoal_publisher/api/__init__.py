"""HTTP routes of the publisher: the content store API, kubo's RPC subset, publications."""
