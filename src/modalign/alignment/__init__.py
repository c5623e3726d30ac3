"""modalign.alignment."""
