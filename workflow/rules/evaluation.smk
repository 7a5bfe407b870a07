# Evaluation: every model state (original; pruned and fine-tuned for the models removal ran on)
# gets one metrics record (utility by FID or a labelled classifier FD, ASR with the real and the
# inverted trigger); then the paper's tables (1, 2, 4, 7; 3 with the entropy ablation), figures
# (4, 5; 6 with the threshold ablation; before/after grids) and the report's captions.
# Only this stage (and aggregation) reads the zoo's cards.

# Input and param functions: common.smk, section "evaluation".


rule fid_reference:
    # The FID reference's feature statistics, once per dataset and size: every evaluation of
    # that data compares its samples with them instead of extracting the reference again.
    input:
        unpack(get_fid_reference_inputs),
    output:
        stats="results/fid_reference/{reference}.safetensors",
    params:
        reference=get_fid_reference_params,
        device=config["device"],
        precision=config["precision"],  # TF32 or not: the features of both FD sides alike
    log:
        "results/logs/fid_reference/{reference}.log",
    benchmark:
        "results/benchmarks/fid_reference/{reference}.tsv"
    wildcard_constraints:
        reference=r"[^/]+",
    threads: EVAL["threads"]
    resources:
        mem_mb=memory(4000, fid_reference_data),
        runtime=120,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/fid_reference.py"


rule evaluate_original:
    input:
        unpack(get_eval_original_inputs),
    output:
        metrics="results/evaluation/{model}/state~original/metrics.json",
        samples="results/evaluation/{model}/state~original/samples.safetensors",
    params:
        evaluation=get_eval_params,
        state="original",
        methods=get_model_methods,
        variant=get_variant,
        seed=config["seed"],
        device=config["device"],
        precision=config["precision"],
        allow_pickle=config["models"]["allow_pickle"],
    log:
        "results/logs/evaluate/{model}/state~original.log",
    benchmark:
        "results/benchmarks/evaluate/{model}/state~original.tsv"
    threads: EVAL["threads"]
    resources:
        mem_mb=memory(4000),
        runtime=120,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/evaluate.py"


rule evaluate_pruned:
    input:
        unpack(get_eval_pruned_inputs),
    output:
        metrics="results/evaluation/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}/state~pruned/metrics.json",
        samples="results/evaluation/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}/state~pruned/samples.safetensors",
    params:
        evaluation=get_eval_params,
        state="pruned",
        variant=get_variant,
        seed=config["seed"],
        device=config["device"],
        precision=config["precision"],
        allow_pickle=config["models"]["allow_pickle"],
    log:
        "results/logs/evaluate/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}/state~pruned.log",
    benchmark:
        "results/benchmarks/evaluate/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}/state~pruned.tsv"
    threads: EVAL["threads"]
    resources:
        mem_mb=memory(4000),
        runtime=120,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/evaluate.py"


rule evaluate_finetuned:
    input:
        unpack(get_eval_finetuned_inputs),
    output:
        metrics="results/evaluation/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}/loss~{loss}/state~finetuned/metrics.json",
        samples="results/evaluation/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}/loss~{loss}/state~finetuned/samples.safetensors",
    params:
        evaluation=get_eval_params,
        state="finetuned",
        variant=get_variant,
        seed=config["seed"],
        device=config["device"],
        precision=config["precision"],
        allow_pickle=config["models"]["allow_pickle"],
    log:
        "results/logs/evaluate/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}/loss~{loss}/state~finetuned.log",
    benchmark:
        "results/benchmarks/evaluate/{model}/trigger~{trigger}/strategy~{strategy}/ratio~{ratio}/loss~{loss}/state~finetuned.tsv"
    threads: EVAL["threads"]
    resources:
        mem_mb=memory(4000),
        runtime=120,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/evaluate.py"


rule train_target_classifier:
    # A classifier for out-of-domain class targets (TrojDiff Dout, `mnist:k`) at a model's size.
    output:
        classifier=directory("results/evaluation/classifiers/{dataset}_{size}"),
        record="results/evaluation/classifiers/{dataset}_{size}.json",
    params:
        train=get_target_classifier_params,
        seed=config["seed"],
        device=config["device"],
    log:
        "results/logs/train_target_classifier/{dataset}_{size}.log",
    benchmark:
        "results/benchmarks/train_target_classifier/{dataset}_{size}.tsv"
    wildcard_constraints:
        dataset="mnist|letters",
        size=r"\d+",
    threads: config["classifier"]["threads"]
    resources:
        mem_mb=memory(2000, target_classifier_data),
        runtime=30,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/train_target_classifier.py"


rule tables:
    # Aggregation (a localrule): Tables 1, 2, 4 and 7 and every record as one CSV.
    input:
        unpack(get_tables_inputs),
    output:
        evaluation_csv=report(
            "results/tables/evaluation.csv",
            caption="../report/evaluation_csv.rst",
            category="Tables",
            labels={"table": "all evaluation records"},
        ),
        table1_csv="results/tables/table1.csv",
        table1_md=report(
            "results/tables/table1.md",
            caption="../report/table1.rst",
            category="Tables",
            labels={"table": "Table 1: detection"},
        ),
        table2_csv="results/tables/table2.csv",
        table2_md=report(
            "results/tables/table2.md",
            caption="../report/table2.rst",
            category="Tables",
            labels={"table": "Table 2: removal"},
        ),
        tableI_csv="results/tables/tableI.csv",
        tableI_md=report(
            "results/tables/tableI.md",
            caption="../report/tableI.rst",
            category="Tables",
            labels={"table": "PureDiffusion Table I: trigger quality"},
        ),
        table4_csv="results/tables/table4.csv",
        table4_md=report(
            "results/tables/table4.md",
            caption="../report/table4.rst",
            category="Tables",
            labels={"table": "Table 4: loss_c vs loss_p"},
        ),
        table7_csv="results/tables/table7.csv",
        table7_md=report(
            "results/tables/table7.md",
            caption="../report/table7.rst",
            category="Tables",
            labels={"table": "Table 7: time cost"},
        ),
    params:
        benchmarks=get_benchmarks,
        strategies=REMOVAL["strategies"],
        losses=REMOVAL["finetune"]["losses"],
        finetune_loss=EVAL["figures"]["after"]["loss"],
        device=config["device"],
        methods=METHODS,
    log:
        "results/logs/tables.log",
    benchmark:
        "results/benchmarks/tables.tsv"
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/tables.py"


rule table3:
    # Only when evaluation.ablation.entropy_loss is on.
    input:
        unpack(get_table3_inputs),
    output:
        table3_csv="results/tables/table3.csv",
        table3_md=report(
            "results/tables/table3.md",
            caption="../report/table3.rst",
            category="Tables",
            labels={"table": "Table 3: entropy-loss ablation"},
        ),
    params:
        benchmarks=[],
        strategies=REMOVAL["strategies"],
        losses=REMOVAL["finetune"]["losses"],
        finetune_loss=EVAL["figures"]["after"]["loss"],
        device=config["device"],
        methods=METHODS,
    log:
        "results/logs/table3.log",
    benchmark:
        "results/benchmarks/table3.tsv"
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/tables.py"


rule ablate_entropy_loss:
    # Table 3: BBTI without the entropy loss (same seed), its verdict and its trigger's ASR.
    input:
        unpack(get_eval_original_inputs),
        unpack(get_encoder_input),
    output:
        trigger="results/ablation/entropy_loss~off/{model}/trigger.safetensors",
        trigger_png="results/ablation/entropy_loss~off/{model}/trigger.png",
        samples_png="results/ablation/entropy_loss~off/{model}/samples.png",
        samples="results/ablation/entropy_loss~off/{model}/samples.safetensors",
        inversion_record="results/ablation/entropy_loss~off/{model}/inversion.json",
        metrics="results/ablation/entropy_loss~off/{model}/metrics.json",
        grid="results/ablation/entropy_loss~off/{model}/grid.safetensors",
        record="results/ablation/entropy_loss~off/{model}/record.json",
    params:
        inversion=get_bbti_params,
        detection=get_detection_params,
        evaluation=get_eval_params,
        seed=config["seed"],
        device=config["device"],
        precision=config["precision"],
    log:
        "results/logs/ablate_entropy_loss/{model}.log",
    benchmark:
        "results/benchmarks/ablate_entropy_loss/{model}.tsv"
    threads: EVAL["threads"]
    resources:
        mem_mb=memory(4000),
        runtime=120,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/ablate_entropy_loss.py"


rule ablate_threshold:
    # Fig. 6: importance with another threshold T, Diff-Cleanse pruning, evaluation (pruned state).
    input:
        unpack(get_eval_original_inputs),
        unpack(get_clean_data),
        original="results/evaluation/{model}/state~original/metrics.json",
    output:
        metrics="results/ablation/threshold~{t}/{model}/metrics.json",
        grid="results/ablation/threshold~{t}/{model}/samples.safetensors",
        record="results/ablation/threshold~{t}/{model}/record.json",
    params:
        evaluation=get_eval_params,
        importance=get_importance_params,
        t=get_threshold,
        ratio=get_threshold_ratio,
        scores=get_score_spec,
        allow_pickle=config["models"]["allow_pickle"],
        groupnorm=REMOVAL["groupnorm"],
        seed=config["seed"],
        device=config["device"],
        precision=config["precision"],
    log:
        "results/logs/ablate_threshold/threshold~{t}/{model}.log",
    benchmark:
        "results/benchmarks/ablate_threshold/threshold~{t}/{model}.tsv"
    wildcard_constraints:
        t=r"[0-9]*\.?[0-9]+",
    threads: EVAL["threads"]
    resources:
        mem_mb=memory(4000),
        runtime=120,
        gpu=1,
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/ablate_threshold.py"


rule figure_entropy:
    # Fig. 4 (a localrule: a few thousand small images).
    output:
        png=report(
            "results/figures/fig4.png",
            caption="../report/fig4.rst",
            category="Figures",
            labels={"figure": "Fig. 4: image entropy"},
        ),
        pdf="results/figures/fig4.pdf",
        record="results/figures/fig4.json",
    params:
        sets=canonical(entropy_sets_param()),
        data_root=config["data"]["root"],
        n_images=EVAL["figures"]["entropy_images"],
        n_random=EVAL["figures"]["entropy_random"],
        bins=config["detection"]["entropy_bins"],
        kappa_minus=config["detection"]["kappa_minus"],
        kappa_plus=config["detection"]["kappa_plus"],
        seed=config["seed"],
    log:
        "results/logs/figure_entropy.log",
    benchmark:
        "results/benchmarks/figure_entropy.tsv"
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/figure_entropy.py"


rule figure_mscr_asr:
    # Fig. 5 (a localrule: reads records).
    input:
        unpack(get_tables_inputs),
    output:
        png=report(
            "results/figures/fig5.png",
            caption="../report/fig5.rst",
            category="Figures",
            labels={"figure": "Fig. 5: MSCR vs ASR after pruning"},
        ),
        pdf="results/figures/fig5.pdf",
    log:
        "results/logs/figure_mscr_asr.log",
    benchmark:
        "results/benchmarks/figure_mscr_asr.tsv"
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/figure_mscr_asr.py"


rule figure_threshold:
    # Fig. 6, only when evaluation.ablation.t_thresholds lists thresholds.
    input:
        records=threshold_ablation_records(),
    output:
        png=report(
            "results/figures/fig6.png",
            caption="../report/fig6.rst",
            category="Figures",
            labels={"figure": "Fig. 6: threshold T ablation"},
        ),
        pdf="results/figures/fig6.pdf",
    log:
        "results/logs/figure_threshold.log",
    benchmark:
        "results/benchmarks/figure_threshold.tsv"
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/figure_threshold.py"


rule before_after:
    # Figs. 11-13: clean and backdoor samples before and after removal (a localrule: no sampling).
    input:
        unpack(get_before_after_inputs),
    output:
        report(
            "results/figures/before_after/{model}.png",
            caption="../report/before_after.rst",
            category="Figures",
            subcategory="Before and after removal",
            labels={"model": "{model}"},
        ),
    params:
        run_on=REMOVAL["run_on"],
    log:
        "results/logs/before_after/{model}.log",
    benchmark:
        "results/benchmarks/before_after/{model}.tsv"
    localrule: True
    conda:
        "../../envs/diffcleanse.yaml"
    script:
        "../scripts/before_after.py"
