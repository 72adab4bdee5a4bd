"""Alembic migrations, shipped as the package edgefleet.migrations."""
