"""Datasets: archives in their published formats → manifests and image trees; synthetic archives."""
