"""The storage layer: the engine and sessions, the table models and the Alembic migrations."""
