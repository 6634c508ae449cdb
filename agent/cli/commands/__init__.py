"""Subcommands of ``hust19``: thin wrappers that parse flags, load settings and call the
modules that do the work."""
