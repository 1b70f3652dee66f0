"""The ``kura`` command line: one module per command group, all thin.

Commands parse options into typed, frozen option objects, call the library and
render results (Rich tables for people, ``--json`` for scripts). Only
``kura.cli.main`` turns a :class:`kura.errors.KuraError` into an exit code.
"""
