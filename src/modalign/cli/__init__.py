"""modalign.cli."""
