# The zoo: fetch models from a hub or a local directory, or train them here (clean or attacked).
# Adaptive-attack rows (attack `adaptive`, Diff-Cleanse Appendix G) train with train_adaptive,
# which also keeps ADAPTIVE_SNAPSHOTS EMA checkpoints for Fig. 14 (workflow/rules/adaptive.smk).


rule fetch_model:
    # A localrule: compute nodes of clusters often have no internet.
    output:
        model=directory("results/models/{model}/model"),
        card="results/models/{model}/card.json",
    params:
        row=get_row,
        allow_pickle=config["models"]["allow_pickle"],
    log:
        "results/logs/fetch_model/{model}.log",
    benchmark:
        "results/benchmarks/fetch_model/{model}.tsv"
    wildcard_constraints:
        model=_alternatives(FETCHED),
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/fetch_model.py"


rule train_model:
    input:
        unpack(get_init_model),
    output:
        model=directory("results/models/{model}/model"),
        card="results/models/{model}/card.json",
    params:
        row=get_row,
        train=get_train_params,
        seed=config["seed"],
        device=config["device"],
        precision=config["precision"],
        checkpoint_dir="results/checkpoints/train_model/{model}",
    log:
        "results/logs/train_model/{model}.log",
    benchmark:
        "results/benchmarks/train_model/{model}.tsv"
    wildcard_constraints:
        model=_alternatives([m for m in TRAINED if m not in ADAPTIVE]),
    priority: get_train_priority
    threads: config["train"]["threads"]
    resources:
        mem_mb=memory(4000, training_data),
        runtime=120,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/train_model.py"


rule train_adaptive:
    # train_model for adaptive-attack rows, keeping EMA checkpoints during training (Fig. 14).
    input:
        unpack(get_init_model),
    output:
        model=directory("results/models/{model}/model"),
        card="results/models/{model}/card.json",
        snapshots=directory("results/models/{model}/snapshots"),
    params:
        row=get_row,
        train=get_train_params,
        snapshot_every=get_snapshot_every,
        seed=config["seed"],
        device=config["device"],
        precision=config["precision"],
        checkpoint_dir="results/checkpoints/train_model/{model}",
    log:
        "results/logs/train_model/{model}.log",
    benchmark:
        "results/benchmarks/train_model/{model}.tsv"
    wildcard_constraints:
        model=_alternatives(ADAPTIVE),
    priority: get_train_priority
    threads: config["train"]["threads"]
    resources:
        mem_mb=memory(4000, training_data),
        runtime=120,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/train_model.py"
