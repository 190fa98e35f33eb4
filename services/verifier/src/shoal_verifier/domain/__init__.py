"""Verification logic: records and rules, free of I/O."""
