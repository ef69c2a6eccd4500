"""The ``memreg <command>`` modules, one per command, apart from the library.

Each module exposes ``add_arguments(parser)`` and ``run(args) -> int`` for :mod:`memreg.cli`: it
defines and checks the flags, checks the output directory, wires library calls and prints. Shared
flags and their checks are in :mod:`.common`. The dependency runs one way: commands import the
library, never the reverse, so the library can be used and tested without the command line.
"""
