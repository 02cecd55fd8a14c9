"""The `gte-jax` subcommands: argument parsing and exit codes only; the work is done by the
library modules they call. ``gte_jax.cli`` dispatches to ``main(argv) -> int`` of each."""
