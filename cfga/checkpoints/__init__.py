"""Checkpoint files ⇄ torchvision modules: formats (recognised from keys), loading, saving."""
