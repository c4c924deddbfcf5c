"""The DICOM node: receive, spool, assemble, select, read pixels, write and send results.

This package knows nothing of Celery or the database; it exposes plain typed
callables and value objects that ``worker`` composes.
"""
