# Stage 2: clean data, channel importance (Taylor, clean vs backdoor), structural pruning by a
# removal method of the registry (Diff-Cleanse: largest n(I_b) - n(I_c); Diff-Pruning: smallest
# clean importance; random: the control), fine-tuning (loss_p or loss_c), or Elijah's removal
# (fine-tuning only), for the models that detection flagged (removal.run_on: flagged), every
# backdoored model (backdoored, the paper's Table 2 protocol) or every model (all). The trigger
# source, strategy, ratio and loss are path components, so changing one reruns only what depends
# on it. Input and param functions: common.smk, section "stage 2".


wildcard_constraints:
    trigger=_alternatives([*trigger_sources(), "none"]),
    strategy=_alternatives(list(removal_methods.METHODS)),
    ratio=r"[0-9]*\.?[0-9]+",
    loss=_alternatives(REMOVAL_LOSSES),
    source="synthetic|real",


rule true_trigger:
    # The oracle trigger source `true`: the model card's real trigger as a trigger file (for the
    # ablation and oracle runs; the defender's chain uses `detected`).
    input:
        card="results/models/{model}/card.json",
        model="results/models/{model}/model",
    output:
        trigger="results/removal/{model}/trigger~true/trigger.safetensors",
    params:
        allow_pickle=config["models"]["allow_pickle"],
    log:
        "results/logs/true_trigger/{model}.log",
    benchmark:
        "results/benchmarks/true_trigger/{model}.tsv"
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/true_trigger.py"


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
        precision=config["precision"],
        allow_pickle=config["models"]["allow_pickle"],
    log:
        "results/logs/clean_data/{model}/{source}.log",
    benchmark:
        "results/benchmarks/clean_data/{model}/{source}.tsv"
    threads: config["removal"]["threads"]
    resources:
        mem_mb=memory(4000, real_clean_data),
        runtime=120,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/clean_data.py"


rule importance:
    input:
        unpack(get_importance_inputs),
    output:
        scores="results/removal/{model}/trigger~{trigger}/importance.safetensors",
        record="results/removal/{model}/trigger~{trigger}/importance.json",
    params:
        importance=get_importance_params,
        kinds=get_importance_kinds,
        seed=config["seed"],
        device=config["device"],
        precision=config["precision"],
        allow_pickle=config["models"]["allow_pickle"],
    log:
        "results/logs/importance/{model}/trigger~{trigger}.log",
    benchmark:
        "results/benchmarks/importance/{model}/trigger~{trigger}.tsv"
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
        scores="results/removal/{model}/trigger~{trigger}/importance.safetensors",
    output:
        model=directory(
            "results/removal/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}/pruned"
        ),
        record="results/removal/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}/prune.json",
    params:
        strategy=get_strategy,
        ratio=get_ratio,
        groupnorm=config["removal"]["groupnorm"],
        scores=get_score_spec,
        allow_pickle=config["models"]["allow_pickle"],
    log:
        "results/logs/prune/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}.log",
    benchmark:
        "results/benchmarks/prune/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}.tsv"
    wildcard_constraints:
        strategy=_alternatives(removal_methods.PRUNING_METHODS),
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
        pruned="results/removal/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}/pruned",
        reference="results/models/{model}/model",
    output:
        model=directory(
            "results/removal/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}/loss~{loss}/finetuned"
        ),
        record="results/removal/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}/loss~{loss}/finetune.json",
    params:
        finetune=get_finetune_params,
        seed=config["seed"],
        device=config["device"],
        precision=config["precision"],
        allow_pickle=config["models"]["allow_pickle"],
        checkpoint_dir="results/checkpoints/finetune/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}/loss~{loss}",
    log:
        "results/logs/finetune/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}/loss~{loss}.log",
    benchmark:
        "results/benchmarks/finetune/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}/loss~{loss}.tsv"
    wildcard_constraints:
        strategy=_alternatives(removal_methods.PRUNING_METHODS),
        loss="p|c",
    threads: config["removal"]["finetune"]["threads"]
    resources:
        mem_mb=memory(4000),
        runtime=240,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/finetune.py"


rule elijah_removal:
    # Elijah's removal (strategy~elijah): fine-tuning against the frozen model with the trigger's
    # deshift losses; nothing pruned (ratio~0), its own loss (loss~elijah).
    input:
        unpack(get_clean_data),
        unpack(get_removal_trigger_inputs),
        model="results/models/{model}/model",
    output:
        model=directory(
            "results/removal/{model}/trigger~{trigger}/strategy~elijah/ratio~0/loss~elijah/finetuned"
        ),
        record="results/removal/{model}/trigger~{trigger}/strategy~elijah/ratio~0/loss~elijah/finetune.json",
    params:
        elijah=get_elijah_params,
        seed=config["seed"],
        device=config["device"],
        precision=config["precision"],
        allow_pickle=config["models"]["allow_pickle"],
        checkpoint_dir="results/checkpoints/elijah/{model}/trigger~{trigger}",
    log:
        "results/logs/elijah_removal/{model}/trigger~{trigger}.log",
    benchmark:
        "results/benchmarks/elijah_removal/{model}/trigger~{trigger}.tsv"
    threads: config["removal"]["elijah"]["threads"]
    resources:
        mem_mb=memory(4000),
        runtime=240,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/elijah_removal.py"


rule removal_summary:
    # One record per model: the verdict removal acted on, and per trigger/strategy/ratio/loss what
    # was removed and the seconds of every stage (a localrule: it only reads records).
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
