"""Backbone families: builders, the feature map, the CFGA layers and where autograd starts (one module per family)."""
