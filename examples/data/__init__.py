"""Offline datasets of the example models: heterogeneous tables and PolyDigits."""
