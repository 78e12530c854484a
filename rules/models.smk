# Checkpoints the pipeline makes itself. Offline backbones: a ResNet classifier trained on a
# dataset's train classes, saved as a torchvision state dict (loaded afterwards exactly like the
# ImageNet files).


rule pretrain_backbone:
    input:
        manifest="results/manifests/{dataset}.csv",
        root="results/datasets/{dataset}",
    output:
        checkpoint="results/checkpoints/pretrained/{dataset}/{model}.pth",
        settings="results/checkpoints/pretrained/{dataset}/{model}.json",
    params:
        arch=lambda wc: MODELS[wc.model]["arch"],
        settings=lambda wc: MODELS[wc.model]["pretrain"],
        device=config["extraction"]["device"],
    log:
        "logs/pretrain/{dataset}/{model}.log",
    benchmark:
        "results/benchmarks/pretrain/{dataset}/{model}.tsv"
    resources:
        gpu=1,
    script:
        "../workflow_scripts/pretrain_backbone.py"
