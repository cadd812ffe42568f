"""Built-in tasks: generated or shipped data and a gold reward no trained model sees."""
