"""Command-line interfaces: ``blockfinder`` and ``impartial-train``."""
