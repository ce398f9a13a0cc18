"""Executors of a plan, one module per array library."""
