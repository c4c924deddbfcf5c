"""Persistence: the typed ORM schema, migrations and queries. Imports nothing of ours."""

__all__: list[str] = []  # the modules are the API: models, repository, engine, migrate
