"""modalign.fusion."""
