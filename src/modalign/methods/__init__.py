"""modalign.methods."""
