# The adaptive attack (Diff-Cleanse Appendix G): the utility of its checkpoints during training
# (Fig. 14) and Diff-Cleanse against it (Table 8). Needs models.smk (ADAPTIVE, snapshot_steps) and
# common.smk (evaluation_records, verdict paths, classifier_key). Its targets: adaptive_outputs().


rule adaptive_snapshot_eval:
    # Utility (and real-trigger ASR) of one checkpoint taken during adaptive training.
    input:
        unpack(get_snapshot_eval_inputs),
    output:
        metrics="results/adaptive/{model}/step~{step}/metrics.json",
        samples="results/adaptive/{model}/step~{step}/samples.safetensors",
    params:
        evaluation=get_eval_params,
        step=get_step,
        seed=config["seed"],
        device=config["device"],
        precision=config["precision"],
        allow_pickle=config["models"]["allow_pickle"],
    log:
        "results/logs/adaptive_snapshot_eval/{model}/step~{step}.log",
    benchmark:
        "results/benchmarks/adaptive_snapshot_eval/{model}/step~{step}.tsv"
    wildcard_constraints:
        model=_alternatives(ADAPTIVE),
        step=r"\d+",
    threads: EVAL["threads"]
    resources:
        mem_mb=memory(4000),
        runtime=60,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/adaptive_snapshot_eval.py"


rule fig14:
    # Aggregation (a localrule): utility of the checkpoints against the training step, per lambda.
    input:
        records=adaptive_snapshot_records(),
        cards=expand("results/models/{model}/card.json", model=ADAPTIVE),
    output:
        png="results/figures/fig14.png",
        pdf="results/figures/fig14.pdf",
        csv="results/tables/fig14.csv",
    params:
        models=ADAPTIVE,
    log:
        "results/logs/fig14.log",
    benchmark:
        "results/benchmarks/fig14.tsv"
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/fig14.py"


rule table8:
    # Aggregation (a localrule): detected, delta utility and delta ASR per lambda.
    input:
        unpack(get_table8_inputs),
    output:
        csv="results/tables/table8.csv",
        md="results/tables/table8.md",
    params:
        models=ADAPTIVE,
        strategy="diffcleanse",
        loss=REMOVAL["finetune"]["losses"][0],
    log:
        "results/logs/table8.log",
    benchmark:
        "results/benchmarks/table8.tsv"
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/table8.py"
