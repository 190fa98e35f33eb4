"""HTTP routes of the verifier (operators' view of a job's verification)."""
