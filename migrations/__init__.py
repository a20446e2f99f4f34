"""Alembic migrations of the skillbank schema (shipped inside the package as skillbank.migrations)."""
