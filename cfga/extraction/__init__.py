"""Images → features: preprocessing, loaders, the batched pipeline, the feature file format."""
