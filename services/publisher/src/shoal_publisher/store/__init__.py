"""The publisher's datastore: a Protocol, a SQLAlchemy implementation and an in-memory fake."""
