"""Checkpoint converters, one module per upstream layout. torch is imported only here and in tests."""
