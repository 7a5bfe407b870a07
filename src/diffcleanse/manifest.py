"""The zoo manifest: a TSV, one row a model, validated against ``manifest.schema.yaml``.

``load_manifest`` reads the file with every cell as text, converts the numeric columns, applies
the schema's defaults, validates every row with ``jsonschema`` and then checks the rules a schema
cannot express (cross-field rules, unique ids, ``init`` references without cycles). Every problem
in the file is collected and reported at once in one :class:`ManifestError`, each naming the
file, the row, the model_id, the column, the bad value and how to fix it.
"""

from __future__ import annotations

import csv
import difflib
import functools
import io
import math
import numbers
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import yaml

SCHEMA_NAME = "manifest.schema.yaml"
INT_COLUMNS = ("image_size", "seed", "train_steps")
FLOAT_COLUMNS = ("poison_rate",)
# class counts for class:<k> targets (celeba: TrojDiff's 8 classes from three attributes)
CLASS_COUNTS = {"cifar10": 10, "mnist": 10, "digits": 10, "celeba": 8, "letters": 10}
TROJDIFF_ONLY_TRIGGERS = ("blend", "patch")
TROJDIFF_ONLY_TARGET_PREFIXES = ("class:", "mnist:", "letters:")
_MAX_LISTED = 60  # problems spelled out in the message (all are kept in ManifestError.problems)
_INT_TEXT = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest: where it is and what to do about it."""

    message: str
    row: int | None = None  # 1-based data row (header and comment lines not counted)
    line: int | None = None  # 1-based line in the file, when known
    model_id: str | None = None
    column: str | None = None

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}" + (f" (line {self.line})" if self.line else ""))
        if self.model_id:
            where.append(f"model_id {self.model_id!r}")
        if self.column:
            where.append(f"column {self.column!r}")
        return (", ".join(where) + ": " if where else "") + self.message


class ManifestError(ValueError):
    """A manifest (or one row) breaks the schema or a cross-row rule; lists every problem."""

    def __init__(self, problems: list[Problem] | list[str], path: str | Path | None = None):
        self.problems = [p if isinstance(p, Problem) else Problem(str(p)) for p in problems]
        self.path = str(path) if path is not None else None
        name = self.path or "manifest row"
        n = len(self.problems)
        lines = [f"{name}: {n} problem{'s' if n != 1 else ''} in the zoo manifest:"]
        lines += [f"  - {p}" for p in self.problems[:_MAX_LISTED]]
        if n > _MAX_LISTED:
            lines.append(f"  ... and {n - _MAX_LISTED} more")
        super().__init__("\n".join(lines))


def schema_path(name: str = SCHEMA_NAME) -> Path:
    """Path of ``workflow/schemas/<name>`` in the source tree, else of the copy in the package.

    Walks up from this file to the repository root (the first directory holding ``pyproject.toml``
    or ``.git``) looking for ``workflow/schemas/<name>``; an installed package, which has no
    workflow directory, falls back to ``diffcleanse/schemas/<name>``.
    """
    here = Path(__file__).resolve().parent
    for parent in (here, *here.parents):
        candidate = parent / "workflow" / "schemas" / name
        if candidate.is_file():
            return candidate
        if (parent / "pyproject.toml").is_file() or (parent / ".git").exists():
            break
    packaged = here / "schemas" / name
    if packaged.is_file():
        return packaged
    raise FileNotFoundError(
        f"schema {name!r} not found in workflow/schemas/ above {here} nor in {here / 'schemas'}"
    )


@functools.cache
def load_schema(name: str = SCHEMA_NAME) -> dict[str, Any]:
    """The parsed schema (cached; do not modify the returned dict)."""
    with open(schema_path(name), encoding="utf-8") as fh:
        schema = yaml.safe_load(fh)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def columns() -> list[str]:
    """All manifest columns, in the canonical order of the schema."""
    return list(load_schema()["properties"])


def required_columns() -> list[str]:
    """Columns every row must give a value for."""
    return list(load_schema()["required"])


def defaults() -> dict[str, Any]:
    """Default values of the optional columns."""
    props = load_schema()["properties"]
    return {k: v["default"] for k, v in props.items() if "default" in v}


def allowed_text(column: str) -> str:
    """Human-readable description of the values a column accepts (used in error messages)."""
    sub = load_schema()["properties"][column]
    forms: list[str] = []
    branches = sub.get("anyOf", [sub])
    for b in branches:
        if "enum" in b:
            forms += [str(v) for v in b["enum"]]
        elif "const" in b:
            forms.append(str(b["const"]))
        elif "title" in b:
            forms.append(b["title"])
    if forms and (len(branches) > 1 or "enum" in sub):
        return "use one of: " + ", ".join(forms)
    kind = {"integer": "a whole number", "number": "a number"}.get(sub.get("type"), "")
    bounds = []
    if "minimum" in sub:
        bounds.append(f">= {sub['minimum']}")
    if "maximum" in sub:
        bounds.append(f"<= {sub['maximum']}")
    if kind or bounds:
        return "must be " + " ".join(x for x in [kind, " and ".join(bounds)] if x)
    if "title" in sub:
        return "must be " + sub["title"]
    return "see the description in " + SCHEMA_NAME


def _blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and _INT_TEXT.match(value.strip()):
        return int(value.strip())
    raise ValueError


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    out = float(value.strip()) if isinstance(value, str) else float(value)
    if not math.isfinite(out):
        raise ValueError
    return out


def _native(value: Any) -> Any:
    """numpy/pandas scalars to plain Python ones."""
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        try:
            return value.item()
        except (AttributeError, ValueError):
            return value
    return value


def _check_row(
    row: Mapping[str, Any], *, absent_ok: frozenset[str] = frozenset()
) -> tuple[dict[str, Any], list[Problem]]:
    """Coerce, default and validate one row; returns the cleaned row and its problems.

    ``absent_ok``: columns already reported missing from the header, not to be re-reported here.
    """
    schema = load_schema()
    cols = list(schema["properties"])
    defs = defaults()
    problems: list[Problem] = []
    mid = row.get("model_id")
    mid = mid.strip() if isinstance(mid, str) else (None if _blank(mid) else str(mid))

    def bad(column: str | None, message: str) -> None:
        problems.append(Problem(message, model_id=mid or None, column=column))

    unknown = [k for k in row if k not in cols]
    for k in unknown:
        hint = difflib.get_close_matches(str(k), cols, n=1)
        bad(
            str(k),
            "unknown column"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + "; allowed columns: "
            + ", ".join(cols),
        )

    out: dict[str, Any] = {}
    skip: set[str] = set()  # columns whose value is already reported
    defaulted: set[str] = set()  # optional columns left empty or absent
    for col in cols:
        value = _native(row.get(col))
        if isinstance(value, str):
            value = value.strip()
        if _blank(value):
            if col in defs:
                out[col] = defs[col]
                defaulted.add(col)
            else:
                skip.add(col)
                if col not in absent_ok:
                    why = "is missing from the row" if col not in row else "is empty"
                    bad(col, f"a value is required but the column {why}; {allowed_text(col)}")
            continue
        try:
            if col in INT_COLUMNS:
                value = _to_int(value)
            elif col in FLOAT_COLUMNS:
                value = _to_float(value)
            elif not isinstance(value, str):
                value = str(value)
        except (ValueError, TypeError, OverflowError):
            skip.add(col)
            bad(
                col,
                f"{value!r} is not {'a whole number' if col in INT_COLUMNS else 'a number'}; "
                f"{allowed_text(col)}",
            )
            continue
        out[col] = value

    validator = jsonschema.Draft202012Validator(schema)
    seen: set[str] = set()
    for err in validator.iter_errors({k: v for k, v in out.items() if k not in skip}):
        col = str(err.path[0]) if err.path else None
        if col is None:  # only required/additionalProperties live at the root: handled above
            continue
        if col in seen:
            continue
        seen.add(col)
        skip.add(col)
        bad(col, f"{out[col]!r} is not allowed; {allowed_text(col)}")

    _cross_field({k: v for k, v in out.items() if k not in skip}, bad, defaulted)
    return out, problems


def _cross_field(ok: dict[str, Any], bad: Callable[[str, str], None], defaulted: set[str]) -> None:
    """Rules between the (individually valid) columns of one row, reported through ``bad``."""

    def shown(col: str) -> str:
        return f"empty (default {ok[col]!r})" if col in defaulted else repr(ok[col])

    attack, trigger, target = ok.get("attack"), ok.get("trigger"), ok.get("target")
    rate, source = ok.get("poison_rate"), ok.get("source")
    if attack == "none":
        if trigger not in (None, "none"):
            bad(
                "trigger",
                f"{trigger!r} given but attack is 'none'; a clean model has trigger "
                "'none' (or set attack to the attack that implants this trigger)",
            )
        if target not in (None, "none"):
            bad(
                "target",
                f"{target!r} given but attack is 'none'; a clean model has target "
                "'none' (or set attack to the attack that implants this target)",
            )
        if rate not in (None, 0, 0.0):
            bad(
                "poison_rate",
                f"{rate!r} given but attack is 'none'; a clean model has "
                "poison_rate 0 (leave it empty)",
            )
    elif attack is not None:
        if trigger == "none":
            bad(
                "trigger",
                f"'none' but attack is {attack!r}; a backdoored model needs a trigger: "
                f"{allowed_text('trigger').removeprefix('use one of: none, ')}",
            )
        if target == "none":
            bad(
                "target",
                f"'none' but attack is {attack!r}; a backdoored model needs a target: "
                f"{allowed_text('target').removeprefix('use one of: none, ')}",
            )
        if rate is not None and rate <= 0:
            bad(
                "poison_rate",
                f"{shown('poison_rate')} but attack is {attack!r}; a backdoored model needs a "
                "poison_rate in (0, 1], e.g. 0.1",
            )
    if attack is not None or ok.get("sampler") is not None:
        _implemented(ok, bad)
    dataset = ok.get("dataset")
    if isinstance(target, str) and target.startswith("class:") and dataset in CLASS_COUNTS:
        k, n = int(target.split(":", 1)[1]), CLASS_COUNTS[dataset]
        if k >= n:
            bad(
                "target",
                f"{target!r} but dataset {dataset!r} has classes 0..{n - 1}; "
                f"use class:0 .. class:{n - 1}",
            )
    steps = ok.get("train_steps")
    if source == "train":
        if steps is not None and steps <= 0:
            bad(
                "train_steps",
                f"{shown('train_steps')} but source is 'train'; give the number of optimiser "
                "steps (> 0)",
            )
    elif source is not None:
        if steps not in (None, 0):
            bad(
                "train_steps",
                f"{steps!r} but source is {source!r}, which is not trained; "
                "leave train_steps empty (0) or set source to 'train'",
            )
        if ok.get("init"):
            bad(
                "init",
                f"{ok['init']!r} but source is {source!r}; init (a row to fine-tune "
                "from) applies only to source 'train': leave it empty",
            )
    return []


def _implemented(ok: dict[str, Any], bad: Callable[[str, str], None]) -> None:
    """What the code can run (the registries of attacks, samplers and model types): a row it
    cannot is refused here, when the workflow's DAG is built, naming the column, the value and
    what is implemented."""
    from diffcleanse import attacks, models, samplers

    attack, sampler, mtype = ok.get("attack"), ok.get("sampler"), ok.get("model_type")
    if mtype is not None and mtype not in models.MODEL_TYPES:
        bad("model_type", f"{mtype!r} is not implemented; implemented model types: "
            f"{', '.join(models.MODEL_TYPES)}")
        return
    if sampler is not None and sampler not in samplers.manifest_names():
        bad("sampler", f"{sampler!r} is not implemented; implemented samplers: "
            f"{', '.join(samplers.manifest_names())}")
        return
    if sampler is not None and mtype is not None and mtype not in samplers.get(sampler).model_types:
        fits = [n for n in samplers.manifest_names() if mtype in samplers.get(n).model_types]
        bad("sampler", f"{sampler!r} cannot sample a {mtype} model; samplers for {mtype}: "
            f"{', '.join(fits)}")
        return
    params = ok.get("attack_params") or ""
    if attack is None:
        return
    if attack == "none":
        if params:
            bad("attack_params", f"{params!r} given but attack is 'none'; a clean model has no "
                "attack parameters (leave it empty)")
        return
    if attack not in attacks.ATTACKS:
        bad("attack", f"{attack!r} is not implemented; implemented attacks: "
            f"{', '.join(attacks.names())}")
        return
    if None in (sampler, mtype, ok.get("trigger"), ok.get("target")):
        return  # reported elsewhere
    for column, message in attacks.get(attack).check(
            model_type=mtype, sampler=sampler, trigger=ok["trigger"], target=ok["target"],
            params=params):
        bad(column, message)


def validate_row(row: dict) -> dict:
    """Validate one manifest row (text or native values) and return it with defaults applied.

    Numeric columns come back as ``int``/``float``. Raises :class:`ManifestError` listing every
    problem of the row. Cross-row rules (unique ids, ``init`` references) need the whole
    manifest: a row with a non-empty ``init`` passes here; :func:`load_manifest` checks it.
    """
    out, problems = _check_row(row)
    if problems:
        raise ManifestError(problems)
    return out


def _table_lines(text: str) -> list[tuple[int, list[str]]]:
    """(1-based line number, tab-separated fields) of the header and data lines.

    Comments (from ``#`` to the end of the line) and blank lines are dropped, as pandas does with
    ``comment="#"``; trailing empty fields (a tab before a comment) are dropped too.
    """
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0]
        if content.strip():
            fields = content.split("\t")
            while len(fields) > 1 and not fields[-1].strip():
                fields.pop()
            out.append((number, fields))
    return out


def load_manifest(path: str | Path) -> pd.DataFrame:
    """Read, validate and default a zoo manifest TSV; the frame is indexed by ``model_id``.

    Text columns have pandas' string dtype, ``image_size``/``seed``/``train_steps`` are int64 and
    ``poison_rate`` float64; columns come in the schema's order (absent optional columns filled
    with their defaults). ``#`` starts a comment anywhere on a line. Raises
    :class:`ManifestError` listing every problem found.
    """
    path = Path(path)
    cols = columns()
    required = set(required_columns())
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError([Problem(f"cannot read the file: {exc}")], path) from exc
    try:
        with warnings.catch_warnings():  # rows longer than the header are reported below
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            raw = pd.read_csv(
                io.StringIO(text),
                sep="\t",
                dtype=str,
                comment="#",
                keep_default_na=False,
                na_filter=False,
                skip_blank_lines=True,
                quoting=csv.QUOTE_NONE,
                index_col=False,
            )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ManifestError(
            [
                Problem(
                    f"not a readable tab-separated table ({exc}); the file needs a header line "
                    f"of tab-separated column names ({', '.join(cols)}) and one row a model"
                )
            ],
            path,
        ) from exc

    problems: list[Problem] = []
    header = [str(c).strip() for c in raw.columns]
    raw.columns = header
    table = _table_lines(text)
    names = [c.strip() for c in table[0][1]] if table else []
    for dup in sorted({c for c in names if c and names.count(c) > 1}):
        problems.append(
            Problem(f"appears {names.count(dup)} times in the header; keep one", column=dup)
        )
    for c in dict.fromkeys(names):
        if c in cols:
            continue
        if c == "":
            msg = "empty column name in the header (a stray tab?); remove it"
        else:
            hint = difflib.get_close_matches(c, cols, n=1)
            msg = "unknown column in the header" + (f" (did you mean {hint[0]!r}?)" if hint else "")
        problems.append(Problem(msg + "; allowed columns: " + ", ".join(cols), column=c or None))
    missing = [c for c in cols if c in required and c not in names]
    for c in missing:
        problems.append(
            Problem(
                f"required column is missing from the header; add a {c!r} "
                f"column ({allowed_text(c)})",
                column=c,
            )
        )

    data = table[1:]
    lines = [number for number, _ in data] if len(data) == len(raw) else []
    for i, (number, fields) in enumerate(data):
        if len(fields) > len(names):
            extra = ", ".join(repr(f) for f in fields[len(names) :])
            problems.append(
                Problem(
                    f"{len(fields)} tab-separated fields but the header has {len(names)} "
                    f"(extra: {extra}); remove the stray tab or value, or add the column",
                    row=i + 1,
                    line=number,
                    model_id=fields[0].strip() or None,
                )
            )
    known = [c for c in header if c in cols]
    rows: list[dict[str, Any]] = []
    for i, rec in enumerate(raw[known].to_dict("records")):
        out, row_problems = _check_row(rec, absent_ok=frozenset(missing))
        line = lines[i] if lines else None
        for p in row_problems:
            problems.append(
                Problem(p.message, row=i + 1, line=line, model_id=p.model_id, column=p.column)
            )
        rows.append(out)

    problems += _cross_row(rows, lines)
    if not rows and not problems:
        problems.append(Problem("the manifest has a header but no model rows; add one row a model"))
    problems.sort(key=lambda p: p.row or 0)
    if problems:
        raise ManifestError(problems, path)

    frame = pd.DataFrame(rows, columns=cols)
    for c in INT_COLUMNS:
        frame[c] = frame[c].astype("int64")
    for c in FLOAT_COLUMNS:
        frame[c] = frame[c].astype("float64")
    for c in cols:
        if c not in INT_COLUMNS and c not in FLOAT_COLUMNS:
            frame[c] = frame[c].astype(str)
    return frame.set_index("model_id", drop=False)


def _cross_row(rows: list[dict[str, Any]], lines: list[int]) -> list[Problem]:
    """Unique model_id; init names another row, same model_type and image_size, no cycles."""
    problems: list[Problem] = []

    def at(i: int) -> dict[str, Any]:
        return {
            "row": i + 1,
            "line": lines[i] if lines else None,
            "model_id": rows[i].get("model_id"),
        }

    first: dict[str, int] = {}
    for i, r in enumerate(rows):
        mid = r.get("model_id")
        if not isinstance(mid, str) or not mid:
            continue
        if mid in first:
            problems.append(
                Problem(
                    f"duplicate model_id {mid!r} (first used in row {first[mid] + 1}); every row "
                    "needs its own model_id",
                    column="model_id",
                    **at(i),
                )
            )
        else:
            first[mid] = i

    for i, r in enumerate(rows):
        init = r.get("init")
        if not init or r.get("source") != "train":
            continue
        if init == r.get("model_id"):
            problems.append(
                Problem(
                    f"{init!r} names the row itself; init must name another row "
                    "(the model to fine-tune from) or be empty",
                    column="init",
                    **at(i),
                )
            )
        elif init not in first:
            hint = difflib.get_close_matches(init, list(first), n=3)
            problems.append(
                Problem(
                    f"{init!r} is not a model_id of this manifest; name an existing row"
                    + (f" (did you mean {', '.join(map(repr, hint))}?)" if hint else "")
                    + " or leave init empty to train from scratch",
                    column="init",
                    **at(i),
                )
            )
        else:
            base = rows[first[init]]
            for col in ("model_type", "image_size"):
                if base.get(col) is not None and r.get(col) != base.get(col):
                    problems.append(
                        Problem(
                            f"{col} {r.get(col)!r} differs from {base.get(col)!r} of init row "
                            f"{init!r}; fine-tuning keeps the architecture, so make them equal",
                            column="init",
                            **at(i),
                        )
                    )

    # cycles (longer than one row; a row naming itself is reported above)
    parent = {
        r["model_id"]: r["init"]
        for r in rows
        if r.get("model_id") and r.get("init") and r.get("source") == "train"
    }
    reported: set[str] = set()
    for start in parent:
        chain: list[str] = []
        node: str | None = start
        while node in parent and node not in chain:
            chain.append(node)
            node = parent[node]
        if node not in chain:
            continue
        cycle = chain[chain.index(node) :]
        if len(cycle) > 1 and not reported.intersection(cycle):
            reported.update(cycle)
            problems.append(
                Problem(
                    "init references form a cycle: "
                    + " -> ".join([*cycle, cycle[0]])
                    + "; at least one of these rows must train from scratch (empty init) or "
                    "fine-tune a hub/local row",
                    column="init",
                    **at(first[cycle[0]]),
                )
            )
    return problems


def parse_source(source: str) -> dict[str, str | None]:
    """Split a source into ``kind`` (train/hub/local), ``ref`` (repo id or path), ``revision``."""
    if source == "train":
        return {"kind": "train", "ref": None, "revision": None}
    kind, _, rest = source.partition(":")
    if kind == "hub":
        repo, _, revision = rest.partition("@")
        return {"kind": "hub", "ref": repo, "revision": revision or None}
    if kind == "local":
        return {"kind": "local", "ref": rest, "revision": None}
    raise ValueError(f"unknown source {source!r}: {allowed_text('source')}")


def row_to_card(row: Mapping[str, Any] | pd.Series) -> dict[str, Any]:
    """The row as a plain JSON-able dict (columns in schema order) plus ``backdoored``."""
    items = row.to_dict() if isinstance(row, pd.Series) else dict(row)
    card: dict[str, Any] = {}
    for col in columns():
        value = _native(items.get(col, defaults().get(col)))
        if col in INT_COLUMNS and value is not None:
            value = int(value)
        elif col in FLOAT_COLUMNS and value is not None:
            value = float(value)
        elif value is not None:
            value = str(value)
        card[col] = value
    card["backdoored"] = card.get("attack") not in (None, "none")
    return card
