"""Thin command-line fronts: each parses flags and calls the package."""
