"""modalign.nn."""
