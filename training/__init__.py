"""Command-line programs that make fluxsae's models, activations and dictionaries."""
