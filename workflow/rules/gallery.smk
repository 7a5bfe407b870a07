# A picture per model: clean samples beside backdoor samples (noise + trigger).


rule gallery:
    input:
        model="results/models/{model}/model",
        card="results/models/{model}/card.json",
    output:
        report(
            "results/gallery/{model}.png",
            caption="../report/gallery.rst",
            category="Zoo",
            labels={"model": "{model}"},
        ),
    params:
        n_samples=config["gallery"]["n_samples"],
        steps=config["gallery"]["steps"],
        control_trigger=config["gallery"]["control_trigger"],
        seed=config["seed"],
    log:
        "results/logs/gallery/{model}.log",
    benchmark:
        "results/benchmarks/gallery/{model}.tsv"
    threads: 1
    resources:
        mem_mb=memory(2000),
        runtime=30,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/gallery.py"
