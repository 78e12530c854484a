"""Every supported backbone as plain facts: family, channels of the feature/token map, depth.

Pure Python (no torch): the feature registry reads dimensions from here, the config schema's
family ↔ protocol rule too; the builders themselves live in ``cfga.backbones.{resnet,swin,vit}``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """name: torchvision builder name; family: resnet | swin | vit; channels: C of the map F;
    layers: encoder layers (ViT only: the CFGA blocks are L−2 and L−1); patch, image: ViT patch
    and fixed input size."""

    name: str
    family: str
    channels: int
    layers: int | None = None
    patch: int | None = None
    image: int | None = None


ARCH_INFO: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch("resnet50", "resnet", 2048),
        Arch("resnet101", "resnet", 2048),
        Arch("resnet152", "resnet", 2048),
        Arch("swin_t", "swin", 768),
        Arch("swin_s", "swin", 768),
        Arch("swin_b", "swin", 1024),
        Arch("swin_v2_t", "swin", 768),
        Arch("swin_v2_s", "swin", 768),
        Arch("swin_v2_b", "swin", 1024),
        Arch("vit_b_16", "vit", 768, layers=12, patch=16, image=224),
        Arch("vit_b_32", "vit", 768, layers=12, patch=32, image=224),
        Arch("vit_l_16", "vit", 1024, layers=24, patch=16, image=224),
        Arch("vit_l_32", "vit", 1024, layers=24, patch=32, image=224),
        Arch("vit_h_14", "vit", 1280, layers=32, patch=14, image=224),
    ]
}

FAMILIES: tuple[str, ...] = ("resnet", "swin", "vit")

# Protocols each family can be evaluated under (TRANSFORMERS.md §7): a ViT needs its fixed input
# size, so only the cropped scda_224; ms needs the 512-d head that `train:` gives a Swin.
FAMILY_PROTOCOLS: dict[str, tuple[str, ...]] = {
    "resnet": ("scda", "ms", "proxy_anchor", "dgpcrl"),
    "swin": ("scda", "scda_224", "ms"),
    "vit": ("scda_224",),
}


def arch_info(name: str) -> Arch:
    try:
        return ARCH_INFO[name]
    except KeyError:
        raise ValueError(f"unknown arch {name!r}; known: {', '.join(ARCH_INFO)}") from None


def family_of(arch: str) -> str:
    return arch_info(arch).family


def check_protocol(arch: str, protocol: str) -> None:
    """Raise ``ValueError`` naming the protocols that fit when ``protocol`` does not fit ``arch``."""
    check_family_protocol(family_of(arch), protocol, what=f"arch {arch}")


def check_family_protocol(family: str, protocol: str, what: str = "") -> None:
    if protocol not in FAMILY_PROTOCOLS[family]:
        fits = ", ".join(FAMILY_PROTOCOLS[family])
        why = (" (a ViT takes only its fixed 224-px input: use scda_224)"
               if family == "vit" and protocol == "scda" else "")
        raise ValueError(f"protocol {protocol!r} does not fit {what or 'a'} ({family} backbone){why}; "
                         f"protocols for {family}: {fits}")
