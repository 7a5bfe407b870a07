# The zoo: fetch models from a hub or a local directory, or train them here (clean or attacked).


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
        checkpoint_dir="results/checkpoints/train_model/{model}",
    log:
        "results/logs/train_model/{model}.log",
    benchmark:
        "results/benchmarks/train_model/{model}.tsv"
    wildcard_constraints:
        model=_alternatives(TRAINED),
    threads: config["train"]["threads"]
    resources:
        mem_mb=memory(4000),
        runtime=120,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/train_model.py"
