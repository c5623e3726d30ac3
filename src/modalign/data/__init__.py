"""modalign.data."""
