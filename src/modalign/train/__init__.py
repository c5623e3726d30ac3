"""modalign.train."""
