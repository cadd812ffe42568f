"""The shared accelerate loop and one file per training algorithm."""
