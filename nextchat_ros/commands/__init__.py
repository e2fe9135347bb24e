"""Subcommands of the ``nextchat`` command line (one module each)."""
