"""modalign.encoders."""
