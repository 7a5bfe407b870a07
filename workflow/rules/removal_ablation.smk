# The removal ablation (a generalised Fig. 6): per model and trigger source, Diff-Cleanse with
# each normaliser x clean timesteps x ratio, and (trigger~none) Diff-Pruning and the random
# control at every ratio; each variant pruned, evaluated, fine-tuned and evaluated again in one job
# per (model, trigger) (one process start for many variants). Then its table and figures.
# Config: removal.ablation (docs/removal.md). Its functions: common_removal_ablation.smk.


rule removal_ablation:
    input:
        unpack(get_removal_ablation_inputs),
    output:
        records="results/ablation/removal/{model}/trigger~{trigger}/records.json",
        samples="results/ablation/removal/{model}/trigger~{trigger}/samples.safetensors",
    params:
        ablation=get_removal_ablation_params,
        seed=config["seed"],
        device=config["device"],
        precision=config["precision"],
        allow_pickle=config["models"]["allow_pickle"],
    log:
        "results/logs/removal_ablation/{model}/trigger~{trigger}.log",
    benchmark:
        "results/benchmarks/removal_ablation/{model}/trigger~{trigger}.tsv"
    threads: config["removal"]["ablation"]["threads"]
    resources:
        mem_mb=memory(4000),
        runtime=240,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/removal_ablation.py"


rule removal_ablation_table:
    # Aggregation (a localrule): one line per model, trigger source and variant.
    input:
        records=removal_ablation_records(),
    output:
        csv="results/tables/removal_ablation.csv",
        md=report(
            "results/tables/removal_ablation.md",
            caption="../report/removal_ablation.rst",
            category="Tables",
            labels={"table": "removal ablation"},
        ),
    log:
        "results/logs/removal_ablation_table.log",
    benchmark:
        "results/benchmarks/removal_ablation_table.tsv"
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/removal_ablation_table.py"


rule removal_ablation_figure:
    # The generalised Fig. 6 (a localrule: reads records).
    input:
        records=removal_ablation_records(),
    output:
        png=report(
            "results/figures/removal_ablation.png",
            caption="../report/removal_ablation.rst",
            category="Figures",
            labels={"figure": "removal ablation"},
        ),
        pdf="results/figures/removal_ablation.pdf",
    log:
        "results/logs/removal_ablation_figure.log",
    benchmark:
        "results/benchmarks/removal_ablation_figure.tsv"
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/removal_ablation_figure.py"


rule removal_ablation_samples:
    # What noise + the real trigger generates after each variant (a localrule: no sampling).
    input:
        unpack(get_removal_ablation_model_records),
    output:
        report(
            "results/figures/removal_ablation/{model}.png",
            caption="../report/removal_ablation_samples.rst",
            category="Figures",
            subcategory="Removal ablation samples",
            labels={"model": "{model}"},
        ),
    log:
        "results/logs/removal_ablation_samples/{model}.log",
    benchmark:
        "results/benchmarks/removal_ablation_samples/{model}.tsv"
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/removal_ablation_samples.py"
