"""Fine-tune a backbone with a pytorch-metric-learning loss; save it in the authors' format."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
import torch
from _common import rule_logging

from cfga import files
from cfga.checkpoints.load import load_checkpoint, load_model
from cfga.registry.archs import arch_info
from cfga.data.manifest import read_manifest
from cfga.runtime import resolve_device
from cfga.training.dml import TrainSettings, save_trained, settings_record, train_dml

sm = snakemake  # noqa: F821
with rule_logging(sm) as log:
    torch.set_num_threads(sm.threads)
    cfg = dict(sm.params.train)
    loss = cfg.pop("loss")
    cfg.pop("from")
    settings = TrainSettings(**cfg)
    rows = [r for r in read_manifest(sm.input.manifest) if r.split == "train"]
    root = Path(sm.input.root)
    if arch_info(sm.params.arch).family == "resnet":
        backbone, meta = load_checkpoint(sm.input.backbone, sm.params.arch)
        state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    else:  # a Swin: any layout load_model knows, its classifier head dropped
        backbone = load_model(sm.params.arch, "scda", sm.input.backbone, device="cpu")
        meta = backbone.cfga_meta
        state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("head.")}
    device = resolve_device(sm.params.device)
    log.info("%s: %s on %d train images of %s (%s)", sm.wildcards.model, loss, len(rows), sm.wildcards.dataset, device)
    net, history = train_dml(state, sm.params.arch, [root / r.path for r in rows], [r.label for r in rows], loss,
                             settings, device=device, progress=True)
    save_trained(sm.output.checkpoint, net.cpu(), loss)
    files.write_json(sm.output.settings, settings_record(
        settings, loss=loss, arch=sm.params.arch, n_images=len(rows), n_classes=len({r.label for r in rows}),
        history=history, backbone=str(sm.input.backbone), backbone_sha256=meta["sha256"]))
