"""The Celery pipeline from a received study to a stored, delivered result."""
