"""The DICOM node: receive, spool, assemble, select, read pixels, write and send results.

This package knows nothing of Celery or the database; it exposes plain typed
callables and value objects that ``worker`` composes. Modules, one
responsibility each:

=================  ============================================================
``config``         typed configuration (listener, destinations, TLS)
``listener``       the C-ECHO/C-STORE SCP in front of the spool
``tuning``         speed patches to pynetdicom internals (listener and sender)
``spool``          received instances written durably, as received
``part10``         Part 10 file meta encoding; header reading without pixels
``durable``        the one atomic, private (0600/0700) file-write helper
``assembly``       deciding when a received study is complete; its journal
``selection``      is this instance a frontal chest radiograph?
``pixels``         pixel data to the model's input array
``sanitize``       header hygiene: invalid DA/TM, NUL bytes, redacted library logs
``sr`` / ``sc``    the result SR and heatmap Secondary Capture
``send``           C-STORE SCU with retries
``retrieve``       Query/Retrieve SCU: C-FIND, C-GET and C-MOVE from the PACS
``uids``           the UID grammar and derived UIDs
=================  ============================================================

Import from the modules; the package itself exports nothing.
"""

__all__: list[str] = []
