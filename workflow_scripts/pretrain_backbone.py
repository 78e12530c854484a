"""Train the offline stand-in backbone (ResNet or Swin) on a dataset's train split; save a torchvision state dict."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
import torch
from _common import rule_logging

from cfga import files
from cfga.backbones import builder
from cfga.data.manifest import read_manifest
from cfga.runtime import resolve_device
from cfga.training.pretrain import PretrainSettings, train_classifier

sm = snakemake  # noqa: F821
with rule_logging(sm) as log:
    torch.set_num_threads(sm.threads)
    rows = [r for r in read_manifest(sm.input.manifest) if r.split == "train"]
    root = Path(sm.input.root)
    settings = PretrainSettings(**sm.params.settings)
    device = resolve_device(sm.params.device)
    log.info("training %s on %d train images of %s (%s)", sm.params.arch, len(rows), sm.wildcards.dataset, device)
    state, history = train_classifier(
        builder(sm.params.arch), [root / r.path for r in rows], [r.label for r in rows], settings,
        device=device, progress=True,
    )
    with files.atomic_path(sm.output.checkpoint) as tmp:
        torch.save(state, tmp)
    files.write_json(sm.output.settings, {"arch": sm.params.arch, "settings": vars(settings),
                                       "train_images": len(rows), "device": str(device), "history": history})
