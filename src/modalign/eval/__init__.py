"""modalign.eval."""
