"""Publishing logic: the publisher interface and its implementations, free of I/O details."""
