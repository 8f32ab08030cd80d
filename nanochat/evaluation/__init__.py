"""Scoring models: loss and bits per byte, CORE and its bundle format."""
