"""Training stack: recipes, builders, the loop, checkpoints and run directories."""

from modalign.train.recipe import Recipe, load_recipe, validate_recipe

__all__ = ["Recipe", "load_recipe", "validate_recipe"]
