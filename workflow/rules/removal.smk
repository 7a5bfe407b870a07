# Stage 2: clean data, channel importance (Taylor, clean vs backdoor, t > T), structural pruning
# (Diff-Cleanse: largest I_b - I_c; Diff-Pruning: smallest clean importance) and fine-tuning
# (loss_p or loss_c), for the models that detection flagged (removal.run_on: flagged), every
# backdoored model (backdoored, the paper's Table 2 protocol) or every model (all). Strategy, ratio
# and loss are path components, so changing one reruns only what depends on it.


wildcard_constraints:
    strategy="diffcleanse|diffpruning",
    ratio=r"[0-9]*\.?[0-9]+",
    loss="p|c",
    source="synthetic|real",


rule clean_data:
    # Clean images for importance and fine-tuning: sampled from the model itself (data-free, the
    # paper's path) or drawn from its training dataset (removal.clean_data: real).
    input:
        model="results/models/{model}/model",
    output:
        images="results/removal/{model}/{source}.safetensors",
        record="results/removal/{model}/{source}.json",
    params:
        data=get_clean_data_params,
        seed=config["seed"],
        device=config["device"],
    log:
        "results/logs/clean_data/{model}/{source}.log",
    benchmark:
        "results/benchmarks/clean_data/{model}/{source}.tsv"
    threads: config["removal"]["threads"]
    resources:
        mem_mb=memory(4000),
        runtime=120,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/clean_data.py"


rule importance:
    input:
        unpack(get_clean_data),
        model="results/models/{model}/model",
        trigger="results/inversion/{model}/method~bbti/trigger.safetensors",
    output:
        scores="results/removal/{model}/importance.safetensors",
        record="results/removal/{model}/importance.json",
    params:
        importance=get_importance_params,
        seed=config["seed"],
        device=config["device"],
    log:
        "results/logs/importance/{model}.log",
    benchmark:
        "results/benchmarks/importance/{model}.tsv"
    threads: config["removal"]["threads"]
    resources:
        mem_mb=memory(4000),
        runtime=60,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/importance.py"


rule prune:
    input:
        model="results/models/{model}/model",
        scores="results/removal/{model}/importance.safetensors",
    output:
        model=directory("results/removal/{model}/strategy~{strategy}/ratio~{ratio}/pruned"),
        record="results/removal/{model}/strategy~{strategy}/ratio~{ratio}/prune.json",
    params:
        strategy=get_strategy,
        ratio=get_ratio,
        groupnorm=config["removal"]["groupnorm"],
    log:
        "results/logs/prune/{model}/strategy~{strategy}/ratio~{ratio}.log",
    benchmark:
        "results/benchmarks/prune/{model}/strategy~{strategy}/ratio~{ratio}.tsv"
    threads: 1
    resources:
        mem_mb=memory(4000),
        runtime=30,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/prune.py"


rule finetune:
    input:
        unpack(get_clean_data),
        pruned="results/removal/{model}/strategy~{strategy}/ratio~{ratio}/pruned",
        reference="results/models/{model}/model",
    output:
        model=directory(
            "results/removal/{model}/strategy~{strategy}/ratio~{ratio}/loss~{loss}/finetuned"
        ),
        record="results/removal/{model}/strategy~{strategy}/ratio~{ratio}/loss~{loss}/finetune.json",
    params:
        finetune=get_finetune_params,
        seed=config["seed"],
        device=config["device"],
        checkpoint_dir="results/checkpoints/finetune/{model}/strategy~{strategy}/ratio~{ratio}/loss~{loss}",
    log:
        "results/logs/finetune/{model}/strategy~{strategy}/ratio~{ratio}/loss~{loss}.log",
    benchmark:
        "results/benchmarks/finetune/{model}/strategy~{strategy}/ratio~{ratio}/loss~{loss}.tsv"
    threads: config["removal"]["finetune"]["threads"]
    resources:
        mem_mb=memory(4000),
        runtime=240,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/finetune.py"


rule removal_summary:
    # One record per model: the verdict removal acted on, and per strategy/ratio/loss what was
    # removed and the seconds of every stage (a localrule: it only reads records).
    input:
        unpack(get_removal_inputs),
    output:
        "results/removal/{model}/summary.json",
    params:
        run_on=config["removal"]["run_on"],
    log:
        "results/logs/removal_summary/{model}.log",
    benchmark:
        "results/benchmarks/removal_summary/{model}.tsv"
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/removal_summary.py"
