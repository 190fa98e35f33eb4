"""The verifier's datastore: a Protocol, a SQLAlchemy implementation and an in-memory fake."""
