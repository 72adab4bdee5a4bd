"""Alembic migrations, shipped as the package controlplane.migrations."""
