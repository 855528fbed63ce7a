"""Data sets and batch loaders; no training logic lives here."""
