"""Sub-commands of the ``pneumo`` CLI, one module per area it serves.

``service`` (up, listen, worker), ``admin`` (reprocess, db, status, results,
send), ``model`` (train, evaluate).

Each module exposes ``register(subparsers)`` which adds its sub-commands and
sets ``func`` (called with the parsed ``argparse.Namespace``, returning an exit code).
"""

__all__: list[str] = []
