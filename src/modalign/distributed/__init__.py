"""modalign.distributed."""
