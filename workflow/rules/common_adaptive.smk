# Inputs and helpers of the adaptive attack's rules (models.smk's train_adaptive, adaptive.smk):
# functions only, so that the rule files hold rules (snakemake --lint).

ADAPTIVE = [m for m in TRAINED if MANIFEST.loc[m, "attack"] == "adaptive"]
ADAPTIVE_SNAPSHOTS = 5  # the paper evaluates every 10 of 50 epochs


def snapshot_every(model):
    """Steps between the adaptive model's checkpoints of Fig. 14."""
    return max(1, int(MANIFEST.loc[model, "train_steps"]) // ADAPTIVE_SNAPSHOTS)


def snapshot_steps(model):
    """The training steps at which an adaptive model's checkpoints are taken."""
    every = snapshot_every(model)
    return [every * k for k in range(1, ADAPTIVE_SNAPSHOTS + 1)]


def get_snapshot_every(wildcards):
    return snapshot_every(wildcards.model)


def adaptive_outputs():
    """Fig. 14 and Table 8 when the manifest has adaptive rows (nothing otherwise)."""
    if not ADAPTIVE:
        return []
    return [
        *expand("results/figures/fig14.{ext}", ext=["png", "pdf"]),
        "results/tables/fig14.csv",
        *expand("results/tables/table8.{ext}", ext=["csv", "md"]),
    ]


def adaptive_snapshot_records():
    """Fig. 14's records: each checkpoint before the last, then the trained model's own evaluation
    (the last checkpoint is the model: evaluated with the same seeds, it gives the same record)."""
    out = []
    for m in ADAPTIVE:
        final = int(MANIFEST.loc[m, "train_steps"])
        steps = [k for k in snapshot_steps(m) if k < final]
        out += [f"results/adaptive/{m}/step~{k}/metrics.json" for k in steps]
        out.append(f"results/evaluation/{m}/state~original/metrics.json")
    return out


def get_snapshot_eval_inputs(wildcards):
    m = wildcards.model
    out = {"snapshots": f"results/models/{m}/snapshots", "card": f"results/models/{m}/card.json"}
    out.update(fid_inputs(m))
    cls = class_classifier_path(m)
    if cls:
        out["class_classifier"] = cls
    return out


def get_table8_inputs(wildcards):
    """Every evaluation record of the adaptive models (waits for detection with run_on
    flagged), their verdicts and cards."""
    return {
        "evaluations": evaluation_records(ADAPTIVE),
        "verdicts": [f"results/detection/{m}/verdict.json" for m in ADAPTIVE],  # combined
        "cards": [f"results/models/{m}/card.json" for m in ADAPTIVE],
    }


def get_step(wildcards):
    return int(wildcards.step)
