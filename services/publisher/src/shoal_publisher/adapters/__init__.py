"""I/O behind the domain's Protocols: HTTP downloads, the content store, kubo."""
