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
        mem_mb=memory(2000),
        runtime=30,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/train_classifier.py"


rule invert_trigger:
    input:
        unpack(get_encoder_input),
        model="results/models/{model}/model",
    output:
        trigger="results/inversion/{model}/method~bbti/trigger.safetensors",
        trigger_png=report(
            "results/inversion/{model}/method~bbti/trigger.png",
            caption="../report/inversion.rst",
            category="Detection",
            subcategory="Inverted triggers",
            labels={"model": "{model}", "figure": "trigger"},
        ),
        samples_png=report(
            "results/inversion/{model}/method~bbti/samples.png",
            caption="../report/inversion.rst",
            category="Detection",
            subcategory="Inverted triggers",
            labels={"model": "{model}", "figure": "samples"},
        ),
        samples="results/inversion/{model}/method~bbti/samples.safetensors",
        record="results/inversion/{model}/method~bbti/record.json",
    params:
        inversion=get_inversion_params,
        detection=get_detection_params,
        seed=config["seed"],
        device=config["device"],
        allow_pickle=config["models"]["allow_pickle"],
    log:
        "results/logs/invert_trigger/{model}.log",
    benchmark:
        "results/benchmarks/invert_trigger/{model}.tsv"
    threads: config["inversion"]["threads"]
    resources:
        mem_mb=memory(4000),
        runtime=120,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/invert_trigger.py"


checkpoint detect:
    input:
        unpack(get_encoder_input),
        record="results/inversion/{model}/method~bbti/record.json",
        samples="results/inversion/{model}/method~bbti/samples.safetensors",
    output:
        "results/detection/{model}/method~bbti/verdict.json",
    params:
        detection=get_detection_params,
        device=config["device"],
    log:
        "results/logs/detect/{model}.log",
    benchmark:
        "results/benchmarks/detect/{model}.tsv"
    threads: 1
    resources:
        mem_mb=memory(2000),
        runtime=10,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/detect.py"


rule detection_table:
    # Aggregation (a localrule): the only step of this stage that reads the zoo's cards.
    input:
        unpack(get_detection_table_inputs),
    output:
        csv="results/tables/detection.csv",
        md=report(
            "results/tables/detection.md",
            caption="../report/detection_table.rst",
            category="Detection",
        ),
    params:
        mse_threshold=config["detection"]["asr_mse_threshold"],
    log:
        "results/logs/detection_table.log",
    benchmark:
        "results/benchmarks/detection_table.tsv"
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/detection_table.py"
