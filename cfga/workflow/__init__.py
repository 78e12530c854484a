"""What the Snakemake rules call besides the numerics: code fingerprints, locks, shard resources."""
