# Stage 1: a classifier per dataset (the default encoder), trigger inversion (BBTI) per model, the
# detection verdict per model (a checkpoint: removal acts only on flagged models), the Table 1.


rule train_classifier:
    output:
        classifier=directory("results/classifiers/{classifier}"),
        record="results/classifiers/{classifier}.json",
    params:
        dataset=get_classifier_dataset,
        image_size=get_classifier_image_size,
        train=get_classifier_params,
        seed=config["seed"],
        device=config["device"],
    log:
        "results/logs/train_classifier/{classifier}.log",
    benchmark:
        "results/benchmarks/train_classifier/{classifier}.tsv"
    wildcard_constraints:
        classifier=_alternatives(list(CLASSIFIERS)),
    threads: config["classifier"]["threads"]
    resources:
        mem_mb=memory(2000, classifier_data),
        runtime=30,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/train_classifier.py"


rule invert_trigger:
    # One inversion method on one model for one seed index (the method's own settings only).
    input:
        unpack(get_encoder_input),
        model="results/models/{model}/model",
    output:
        trigger="results/inversion/{model}/method~{method}/seed~{seed}/trigger.safetensors",
        trigger_png=report(
            "results/inversion/{model}/method~{method}/seed~{seed}/trigger.png",
            caption="../report/inversion.rst",
            category="Detection",
            subcategory="Inverted triggers",
            labels={"model": "{model}", "method": "{method}", "seed": "{seed}", "figure": "trigger"},
        ),
        samples_png=report(
            "results/inversion/{model}/method~{method}/seed~{seed}/samples.png",
            caption="../report/inversion.rst",
            category="Detection",
            subcategory="Inverted triggers",
            labels={"model": "{model}", "method": "{method}", "seed": "{seed}", "figure": "samples"},
        ),
        samples="results/inversion/{model}/method~{method}/seed~{seed}/samples.safetensors",
        record="results/inversion/{model}/method~{method}/seed~{seed}/record.json",
    params:
        inversion=get_inversion_params,
        detection=get_detection_params,
        seed=config["seed"],
        device=config["device"],
        precision=config["precision"],
        allow_pickle=config["models"]["allow_pickle"],
    log:
        "results/logs/invert_trigger/{model}/method~{method}/seed~{seed}.log",
    benchmark:
        "results/benchmarks/invert_trigger/{model}/method~{method}/seed~{seed}.tsv"
    threads: config["inversion"]["threads"]
    resources:
        mem_mb=memory(4000),
        runtime=120,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/invert_trigger.py"


rule detect_method:
    # The MSCR verdict of one inversion, recomputed from its samples (so changing a threshold
    # reruns only this step).
    input:
        unpack(get_encoder_input),
        record="results/inversion/{model}/method~{method}/seed~{seed}/record.json",
        samples="results/inversion/{model}/method~{method}/seed~{seed}/samples.safetensors",
    output:
        "results/detection/{model}/method~{method}/seed~{seed}/verdict.json",
    params:
        detection=get_detection_params,
        device=config["device"],
        precision=config["precision"],
    log:
        "results/logs/detect/{model}/method~{method}/seed~{seed}.log",
    benchmark:
        "results/benchmarks/detect/{model}/method~{method}/seed~{seed}.tsv"
    threads: 1
    resources:
        mem_mb=memory(2000),
        runtime=10,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/detect.py"


checkpoint detect:
    # The combined verdict of a model (a checkpoint: removal acts only on flagged models): per seed,
    # flagged when any method's trigger reaches kappa_d; the model is flagged when at least half of
    # the seeds are; the trigger removal uses is the most effective one (highest MSCR).
    input:
        unpack(get_combine_inputs),
    output:
        verdict="results/detection/{model}/verdict.json",
        trigger="results/detection/{model}/trigger.safetensors",
    params:
        methods=METHODS,
        seeds=SEEDS,
    log:
        "results/logs/detect/{model}/combined.log",
    benchmark:
        "results/benchmarks/detect/{model}/combined.tsv"
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/combine_verdicts.py"


rule detect_population:
    # Aggregation (a localrule: it reads the zoo's cards for the labels): a method's own detector
    # over every model's statistics, each model judged by a detector that never saw it.
    input:
        unpack(get_population_inputs),
    output:
        "results/detection/population/method~{method}.json",
    params:
        population=config["detection"]["population"],
        seeds=SEEDS,
    log:
        "results/logs/detect_population/method~{method}.log",
    benchmark:
        "results/benchmarks/detect_population/method~{method}.tsv"
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/detect_population.py"


rule detection_table:
    # Aggregation (a localrule): the only steps of this stage that read the zoo's cards.
    input:
        unpack(get_detection_table_inputs),
    output:
        csv="results/tables/detection.csv",
        md=report(
            "results/tables/detection.md",
            caption="../report/detection_table.rst",
            category="Detection",
        ),
        roc_csv="results/tables/detection_roc.csv",
        roc_png=report(
            "results/figures/roc.png",
            caption="../report/roc.rst",
            category="Detection",
        ),
        roc_pdf="results/figures/roc.pdf",
    params:
        mse_threshold=config["detection"]["asr_mse_threshold"],
        population=config["detection"]["population"],
        methods=METHODS,
        seeds=SEEDS,
    log:
        "results/logs/detection_table.log",
    benchmark:
        "results/benchmarks/detection_table.tsv"
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/detection_table.py"
