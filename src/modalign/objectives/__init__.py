"""modalign.objectives."""
