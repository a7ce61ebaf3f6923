"""One module per `styleheat` subcommand.

Each module defines ``NAME`` (the subcommand), ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int`` (the exit status). Register a new module in ``server.cli.COMMAND_MODULES``.
"""
