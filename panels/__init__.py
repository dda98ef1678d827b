"""App panels."""

PANELS: list = []
