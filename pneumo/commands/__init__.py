"""Sub-commands of the ``pneumo`` CLI, one module per area.

Each module exposes ``register(subparsers)`` which adds its sub-commands and
sets ``func`` (called with the parsed ``argparse.Namespace``, returning an exit code).
"""
