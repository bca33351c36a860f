"""Examples, importable as sentinel.examples."""
