"""Opt-in, per image: what a heatmap needs, from the very forward pass that yields the features.

Backbone-neutral: ``batch_features(..., maps=...)`` asks the backbone's tail for the CFGA+ layers'
inputs as [C, h, w] maps, keyed by the model's own CFGA+ feature names (ResNet: the inputs of
layer4.1.conv2 and layer4.2.conv2; Swin, ViT: the qkv linears' input tokens on the grid,
method.md §T9). The default extraction path never computes any of this.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from cfga.extraction.pipeline import batch_features, exact_float32
from cfga.extraction.preprocess import ImageLike, load_rgb, resize_image, to_normalized_tensor
from cfga.numerics.cam import cfga_map
from cfga.registry.protocols import Protocol, get_protocol
from cfga.runtime import model_device


@dataclass
class ImageMaps:
    """One image: the network input as a picture, its SCDA mask on the feature grid, its
    features, and the CFGA map of each CFGA+ layer at the picture's size."""

    image: Image.Image
    mask: np.ndarray  # bool [h, w]
    features: dict[str, np.ndarray]
    cfga_maps: dict[str, np.ndarray]  # {CFGA+ layer feature name: float32 [H, W]}, CFGA+ order


def cfga_heatmaps(model: torch.nn.Module, images: Sequence[ImageLike], protocol: str | Protocol) -> list[ImageMaps]:
    """Features, SCDA mask and CFGA maps (``cfga.numerics.cam``) of each image, one at a time."""
    proto = get_protocol(protocol)
    device = model_device(model)
    out = []
    for image in images:
        pic = resize_image(load_rgb(image), proto.resize)
        x = to_normalized_tensor(pic)[None].to(device)
        taps: dict = {}
        with exact_float32():
            feats = batch_features(model, x, proto, maps=taps)
        size = (pic.height, pic.width)
        cmaps = {n: cfga_map(feats[n][0].detach(), taps["inputs"][n][0], size).cpu().numpy()
                 for n in taps["inputs"]}
        out.append(ImageMaps(pic, taps["mask"][0].cpu().numpy(),
                             {k: v[0].detach().cpu().numpy() for k, v in feats.items()}, cmaps))
    return out
