"""Rule before_after: clean and backdoor samples of a model before and after removal."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0])  # noqa: F821

from diffcleanse import reporting  # noqa: E402
from diffcleanse.records import read_json  # noqa: E402

inp = snakemake.input  # noqa: F821
note = ""
if inp.get("after") is None:
    run_on = snakemake.params.run_on  # noqa: F821
    if inp.get("verdict") is not None:
        verdict = read_json(inp.verdict)
        note = f"no removal: detection did not flag it (MSCR {verdict['mscr']:.2f})"
    else:
        listed = ", ".join(run_on) if isinstance(run_on, list) else run_on
        note = f"no removal here (removal.run_on: {listed})"
reporting.before_after(
    inp.before,
    inp.before_samples,
    snakemake.output[0],  # noqa: F821
    after_record=inp.get("after"),
    after_samples=inp.get("after_samples"),
    note=note,
)
log.info("%s", note or "before and after")
