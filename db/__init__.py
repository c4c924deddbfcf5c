"""Persistence: the typed ORM schema, migrations and queries. Imports nothing of ours."""
