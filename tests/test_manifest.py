"""Tests of the zoo manifest: the shipped manifests load, bad ones fail with clear messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffcleanse.manifest import (
    ManifestError,
    columns,
    load_manifest,
    row_to_card,
    schema_path,
    validate_row,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config"
HEADER = columns()
GOOD = {
    "model_id": "clean-a",
    "source": "train",
    "init": "",
    "model_type": "ddpm",
    "dataset": "digits",
    "image_size": "16",
    "attack": "none",
    "trigger": "none",
    "target": "none",
    "poison_rate": "0",
    "seed": "0",
    "train_steps": "100",
    "sampler": "ddpm",
    "attack_params": "",
    "group": "DDPM-D",
}
BD = {
    **GOOD,
    "model_id": "bd",
    "init": "clean-a",
    "attack": "baddiffusion",
    "trigger": "box_14",
    "target": "hat",
    "poison_rate": "0.5",
    "seed": "1",
}


def write_tsv(tmp_path: Path, rows: list[dict[str, str]], header: list[str] | None = None) -> Path:
    header = header or HEADER
    lines = ["\t".join(header)] + ["\t".join(str(r.get(c, "")) for c in header) for r in rows]
    path = tmp_path / "zoo.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def error_of(tmp_path: Path, rows: list[dict[str, str]], header: list[str] | None = None) -> str:
    path = write_tsv(tmp_path, rows, header)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    msg = str(info.value)
    assert str(path) in msg  # every message names the file
    return msg


# ---------------------------------------------------------------- shipped manifests


@pytest.mark.parametrize("name", ["zoo-default.tsv", "zoo-smoke.tsv"])
def test_shipped_manifests_load(name: str) -> None:
    df = load_manifest(CONFIG / name)
    assert list(df.columns) == HEADER
    assert df.index.name == "model_id" and list(df.index) == list(df["model_id"])
    assert df["image_size"].dtype.kind == "i" and df["seed"].dtype.kind == "i"
    assert df["train_steps"].dtype.kind == "i" and df["poison_rate"].dtype.kind == "f"
    assert (df["attack"] == "none").any() and (df["attack"] != "none").any()


def test_default_manifest_content() -> None:
    df = load_manifest(CONFIG / "zoo-default.tsv")
    assert list(df.index) == ["clean-a", "clean-b", "clean-c", "bd-box-hat", "bd-stop-corner",
                              "vd-box-shoe", "tj-blend-mickey", "ad-box-shoe"]
    # three clean models: Elijah's random forest, judging one clean model, still needs two
    assert (df["attack"] == "none").sum() == 3
    # one VillanDiffusion model on an ODE sampler, one TrojDiff and one adaptive model
    assert df.loc["vd-box-shoe", "sampler"] == "dpmpp_o2"
    assert df.loc["tj-blend-mickey", "attack_params"] == "gamma=0.6"
    assert df.loc["ad-box-shoe", "attack"] == "adaptive"
    assert set(df.loc[df["attack"] != "none", "init"]) == {"clean-a"}
    assert df.loc["bd-box-hat", "init"] == "clean-a"
    assert df.loc["bd-stop-corner", "trigger"] == "stop_14"


def test_smoke_manifest_content() -> None:
    df = load_manifest(CONFIG / "zoo-smoke.tsv")
    assert list(df.index) == ["smoke-clean", "smoke-bd", "smoke-vd", "smoke-tj", "smoke-ad"]
    bd = df.loc["smoke-bd"]
    assert (bd["init"], bd["attack"], bd["trigger"], bd["target"]) == (
        "smoke-clean",
        "baddiffusion",
        "box_14",
        "hat",
    )
    assert bd["poison_rate"] == 0.5 and bd["seed"] == 1 and bd["train_steps"] == 300
    # one row per attack, each fine-tuned from the clean smoke model
    assert set(df["attack"]) == {"none", "baddiffusion", "villandiffusion", "trojdiff", "adaptive"}
    assert set(df.loc[df["attack"] != "none", "init"]) == {"smoke-clean"}


def test_paper_manifest_counts() -> None:
    full = load_manifest(CONFIG / "paper" / "manifest.tsv")
    df = full[full["group"] != "ADAPT"]  # the benchmark; ADAPT: Appendix G's adaptive models
    assert len(df) == 373
    assert int((df["attack"] == "none").sum()) == 177
    assert set(df["attack"]) == {"none", "baddiffusion", "villandiffusion", "trojdiff"}
    adapt = full[full["group"] == "ADAPT"]
    assert set(adapt["attack"]) == {"adaptive"} and len(adapt) == 4
    assert set(df["group"]) == {
        "DDPM-C",
        "DDPM-A",
        "ODE-C",
        "ODE-A",
        "NCSN-C",
        "LDM-A",
        "D2I",
        "Din",
        "Dout",
    }
    assert df["seed"].is_unique
    hub = df[df["source"].str.startswith("hub:")]
    assert {"hub:google/ddpm-cifar10-32", "hub:google/ddpm-ema-celebahq-256"} <= set(hub["source"])


def test_paper_manifest_is_generated(tmp_path: Path) -> None:
    out = tmp_path / "manifest.tsv"
    script = ROOT / "workflow" / "scripts" / "make_paper_manifest.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--out", str(out), "--seed", "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "373 models, 177 clean, 196 backdoored" in proc.stdout
    assert out.read_text() == (CONFIG / "paper" / "manifest.tsv").read_text(), (
        "config/paper/manifest.tsv is stale: rerun workflow/scripts/make_paper_manifest.py"
    )


def test_schema_is_shipped_in_package_and_linked() -> None:
    link = ROOT / "workflow" / "schemas" / "manifest.schema.yaml"
    packaged = ROOT / "src" / "diffcleanse" / "schemas" / "manifest.schema.yaml"
    assert packaged.is_file()
    assert link.resolve() == packaged.resolve()
    assert schema_path("manifest.schema.yaml").resolve() == packaged.resolve()


# ---------------------------------------------------------------- loading details


def test_defaults_comments_and_optional_columns(tmp_path: Path) -> None:
    header = [c for c in HEADER if c not in ("init", "poison_rate", "train_steps", "group")]
    row = {**GOOD, "source": "hub:google/ddpm-cifar10-32@main"}
    path = tmp_path / "zoo.tsv"
    path.write_text(
        "# a comment line\n"
        + "\t".join(header)
        + "\n\n"
        + "\t".join(row[c] for c in header)
        + "\t# trailing comment\n"
    )
    df = load_manifest(path)
    rec = df.loc["clean-a"]
    assert rec["init"] == "" and rec["group"] == ""
    assert rec["poison_rate"] == 0.0 and rec["train_steps"] == 0


def test_row_to_card_is_json_able() -> None:
    df = load_manifest(CONFIG / "zoo-default.tsv")
    card = row_to_card(df.loc["bd-box-hat"])
    assert json.loads(json.dumps(card)) == card
    assert card["backdoored"] is True and card["poison_rate"] == 0.3 and card["seed"] == 2
    assert type(card["seed"]) is int


def test_validate_row_applies_defaults() -> None:
    row = {k: v for k, v in BD.items() if k not in ("group",)}
    out = validate_row(row)
    assert out["group"] == "" and out["image_size"] == 16 and out["poison_rate"] == 0.5


def test_validate_row_reports_all_problems() -> None:
    with pytest.raises(ManifestError) as info:
        validate_row({**BD, "attack": "badnet", "sampler": "euler", "image_size": "x"})
    msg = str(info.value)
    assert "badnet" in msg and "euler" in msg and "'x'" in msg
    assert len(info.value.problems) == 3


# ---------------------------------------------------------------- bad manifests


def test_duplicate_model_id(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [GOOD, {**GOOD, "seed": "5"}])
    assert "duplicate model_id 'clean-a'" in msg and "row 2" in msg


def test_unknown_attack(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [GOOD, {**BD, "attack": "badiff"}])
    assert "column 'attack'" in msg and "'badiff'" in msg
    assert "baddiffusion, villandiffusion, trojdiff" in msg and "model_id 'bd'" in msg


def test_unknown_trigger(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [GOOD, {**BD, "trigger": "box_15"}])
    assert "column 'trigger'" in msg and "'box_15'" in msg and "box_14" in msg
    assert "file:<path" in msg


def test_exact_tensor_triggers_and_targets(tmp_path: Path) -> None:
    """tensor:<key>:<file> names another attack code's trigger exactly (the external zoo's);
    a tensor: value without its key or file is refused with the form it needs."""
    rows = [GOOD, {**BD, "trigger": "tensor:trigger:zoo/truth.safetensors",
                   "target": "tensor:target:zoo/truth.safetensors"}]
    m = load_manifest(write_tsv(tmp_path, rows))
    assert m.loc["bd", "trigger"] == "tensor:trigger:zoo/truth.safetensors"
    msg = error_of(tmp_path, [GOOD, {**BD, "trigger": "tensor:truth.safetensors"}])
    assert "column 'trigger'" in msg and "tensor:<key>:<path" in msg


def test_external_zoo_manifest_is_valid() -> None:
    """config/zoo-external.tsv (the external zoo's three models) loads as written."""
    root = Path(__file__).resolve().parents[1]
    m = load_manifest(root / "config" / "zoo-external.tsv")
    assert list(m.index) == ["ext-clean", "ext-bd-box-corner", "ext-bd-stop-hat"]
    assert all(v.startswith("tensor:trigger:") for v in m.loc[m["attack"] != "none", "trigger"])


def test_unknown_target(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [GOOD, {**BD, "target": "fedora"}])
    assert "column 'target'" in msg and "'fedora'" in msg and "mickey" in msg


def test_unknown_sampler(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [{**GOOD, "sampler": "euler"}])
    assert "column 'sampler'" in msg and "'euler'" in msg and "ddim" in msg


def test_missing_required_column(tmp_path: Path) -> None:
    header = [c for c in HEADER if c != "sampler"]
    msg = error_of(tmp_path, [GOOD, BD], header)
    assert "column 'sampler'" in msg and "missing from the header" in msg
    assert msg.count("sampler") < 10  # reported once for the file, not once per row


def test_unknown_column_is_an_error(tmp_path: Path) -> None:
    header = [("poision_rate" if c == "poison_rate" else c) for c in HEADER]
    rows = [{**GOOD, "poision_rate": "0"}]
    msg = error_of(tmp_path, rows, header)
    assert "'poision_rate'" in msg and "did you mean 'poison_rate'" in msg


@pytest.mark.parametrize(
    ("column", "value"),
    [("poison_rate", "1.5"), ("image_size", "0"), ("seed", "1.5"), ("seed", "-1")],
)
def test_bad_value(tmp_path: Path, column: str, value: str) -> None:
    msg = error_of(tmp_path, [GOOD, {**BD, column: value}])
    assert f"column '{column}'" in msg and repr(value).strip("'") in msg
    assert "row 2" in msg and "model_id 'bd'" in msg


def test_non_integer_seed_message(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [{**GOOD, "seed": "abc"}])
    assert "'abc' is not a whole number" in msg


def test_clean_row_with_trigger(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [{**GOOD, "trigger": "box_14"}])
    assert "column 'trigger'" in msg and "attack is 'none'" in msg


def test_clean_row_with_target_or_rate(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [{**GOOD, "target": "hat", "poison_rate": "0.1"}])
    assert "column 'target'" in msg and "column 'poison_rate'" in msg


def test_backdoored_row_without_trigger(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [GOOD, {**BD, "trigger": "none"}])
    assert "column 'trigger'" in msg and "needs a trigger" in msg


def test_backdoored_row_without_poison(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [GOOD, {**BD, "poison_rate": ""}])
    assert "column 'poison_rate'" in msg and "empty (default 0)" in msg


def test_trojdiff_only_patterns(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [GOOD, {**BD, "trigger": "blend", "target": "class:3"}])
    assert "'blend' is a TrojDiff trigger" in msg and "'class:3'" in msg
    ok = write_tsv(
        tmp_path,
        [GOOD, {**BD, "attack": "trojdiff", "trigger": "patch", "target": "mnist:7",
                "attack_params": "gamma=0.1"}],
    )
    assert load_manifest(ok).loc["bd", "target"] == "mnist:7"


def test_class_target_out_of_range(tmp_path: Path) -> None:
    row = {**BD, "attack": "trojdiff", "trigger": "blend", "target": "class:10",
           "attack_params": "gamma=0.6"}
    msg = error_of(tmp_path, [GOOD, row])
    assert "class:10" in msg and "class:9" in msg


def test_init_not_in_manifest(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [GOOD, {**BD, "init": "clean-aa"}])
    assert "column 'init'" in msg and "'clean-aa' is not a model_id" in msg
    assert "did you mean 'clean-a'" in msg


def test_init_self_and_cycle(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [{**GOOD, "init": "clean-a"}])
    assert "names the row itself" in msg
    a = {**GOOD, "model_id": "a", "init": "b"}
    b = {**GOOD, "model_id": "b", "init": "a", "seed": "1"}
    msg = error_of(tmp_path, [a, b])
    assert "cycle: a -> b -> a" in msg


def test_init_needs_train_source(tmp_path: Path) -> None:
    row = {**BD, "source": "hub:org/backdoored-model", "train_steps": ""}
    msg = error_of(tmp_path, [GOOD, row])
    assert "column 'init'" in msg and "only to source 'train'" in msg


def test_init_architecture_must_match(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [GOOD, {**BD, "image_size": "32"}])
    assert "image_size 32 differs from 16" in msg


@pytest.mark.parametrize("source", ["hub", "hub:", "hub:repo-only", "gs://bucket/x", "local:", ""])
def test_bad_source(tmp_path: Path, source: str) -> None:
    msg = error_of(tmp_path, [{**GOOD, "source": source, "train_steps": ""}])
    assert "column 'source'" in msg
    assert "train, hub:<org>/<repo>[@<revision>], local:" in msg


@pytest.mark.parametrize(
    "source", ["train", "hub:google/ddpm-cifar10-32", "hub:org/repo@v1.0", "local:models/x"]
)
def test_good_source(source: str) -> None:
    row = {**GOOD, "source": source, "train_steps": "100" if source == "train" else ""}
    assert validate_row(row)["source"] == source


def test_train_source_needs_steps(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [{**GOOD, "train_steps": "0"}])
    assert "column 'train_steps'" in msg and "source is 'train'" in msg


def test_bad_model_id(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [{**GOOD, "model_id": "bad/id"}])
    assert "column 'model_id'" in msg and "'bad/id'" in msg


def test_all_problems_reported_together(tmp_path: Path) -> None:
    rows = [GOOD, {**BD, "attack": "x"}, {**BD, "model_id": "bd2", "sampler": "y", "seed": "z"}]
    path = write_tsv(tmp_path, rows)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert len(info.value.problems) == 3
    assert [p.row for p in info.value.problems] == [2, 3, 3]
    assert all(p.line == p.row + 1 for p in info.value.problems)


def test_ragged_row_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "zoo.tsv"
    path.write_text("\t".join(HEADER) + "\n" + "\t".join([*GOOD.values(), "extra"]) + "\n")
    n = len(HEADER)
    with pytest.raises(ManifestError, match=f"{n + 1} tab-separated fields but the header has {n}"):
        load_manifest(path)


def test_empty_manifest(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [])
    assert "no model rows" in msg


def test_duplicate_header_column(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [GOOD], [*HEADER, "seed"])
    assert "column 'seed': appears 2 times in the header" in msg
