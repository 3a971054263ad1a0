"""Subcommands of `repscope` for jobs: run, nightly, ground, show, report, submit, status,
logs, stop."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from repscope.errors import InputError
from repscope.jobs import report as report_mod
from repscope.jobs import submit as submit_mod
from repscope.store.cli import parse_storage_options, storage_option_arg


def _address(parser, required: bool = False) -> None:
    parser.add_argument(
        "--address",
        required=required,
        help="Ray cluster: for run, a GCS address (HOST:6379) or ray:// URL (default: "
        "RAY_ADDRESS, else an embedded local instance); for submit/status/logs/stop, the "
        "dashboard URL http://HOST:8265",
    )


def _run_keeping_stdout(job):
    """Run a job with stdout kept for the summary: Ray prints cluster events (a lost node, a
    retried task) to stdout, so during the job they go to stderr, and the driver disconnects
    from Ray before the summary is written (the executor closes when the job ends), so
    nothing can follow it."""
    real_stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        return job()
    finally:
        ray = sys.modules.get("ray")  # imported only if the job ran on Ray
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        sys.stdout = real_stdout


def _job_command(job, args) -> int:
    """run and nightly: load the spec, run the job, print the summary (JSON with --json)."""
    from repscope.jobs.spec import load_spec

    spec = load_spec(args.spec)
    summary = _run_keeping_stdout(
        lambda: job(spec, address=args.address, overwrite=args.overwrite))
    if args.json:
        print(json.dumps(summary.to_dict()))
    else:
        print(
            f"done: {summary.units} units, {summary.pairs_computed} of {summary.pairs_total} "
            f"pairs computed ({summary.pairs_reused} reused), {summary.rows:,} rows, "
            f"{summary.seconds:.1f} s -> {summary.output}"
        )
    return 0


def cmd_run(args) -> int:
    from repscope.jobs.pipeline import run_job

    return _job_command(run_job, args)


def cmd_nightly(args) -> int:
    from repscope.jobs.nightly import nightly_job

    return _job_command(nightly_job, args)


def cmd_show(args) -> int:
    from repscope.jobs.results import open_results
    from repscope.store import redact

    ds = open_results(args.results, parse_storage_options(args.storage_option))
    report_mod.check_results(ds, redact(args.results))
    text = report_mod.show_json(ds, args.metric) if args.json else report_mod.show_text(
        ds, args.metric)
    print(text)
    return 0


def cmd_report(args) -> int:
    """PNG heatmaps and the HTML page into --out (both unless --png or --html picks one)."""
    from repscope.errors import InputError
    from repscope.jobs import report_html
    from repscope.jobs.report_files import ReportFolder
    from repscope.jobs.results import open_results
    from repscope.store import redact

    png, page = (args.png or not args.html), (args.html or not args.png)
    if args.ground is not None and not page:
        raise InputError("--ground adds tables to the HTML report; drop --png or add --html")
    if args.ground is not None:
        report_html.ground_tables(args.ground)  # a wrong folder fails before any work
    ds = open_results(args.results, parse_storage_options(args.storage_option))
    report_mod.check_results(ds, redact(args.results))
    names = report_mod.pick_metrics(ds, args.metric)
    # Every file is checked before the first is written (report_files.ReportFolder).
    planned = [p.path for p in report_mod.plan_report(ds, args.out, names)] if png else []
    ReportFolder(args.out).claim(planned + ([Path(args.out) / report_html.HTML_NAME]
                                            if page else []))
    files = report_mod.write_report(ds, args.out, args.metric, args.scale) if png else []
    if page:
        files.append(report_html.write_html(ds, args.out, metric=args.metric, scale=args.scale,
                                            ground=args.ground, source=redact(args.results)))
    for path in files:
        print(path)
    return 0


def cmd_submit(args) -> int:
    job_id = submit_mod.submit(
        args.spec, args.address, submission_id=args.submission_id, overwrite=args.overwrite,
        nightly=args.nightly,
    )
    print(job_id)
    if not args.wait:
        return 0
    state = submit_mod.wait(args.address, job_id, out=sys.stderr)
    print(f"job {job_id}: {state}", file=sys.stderr)
    return 0 if state == "SUCCEEDED" else 1


def cmd_status(args) -> int:
    info = submit_mod.status(args.address, args.id)
    print(json.dumps(info) if args.json else f"{info['submission_id']}: {info['status']}")
    return 0


def cmd_logs(args) -> int:
    sys.stdout.write(submit_mod.logs(args.address, args.id))
    return 0


def cmd_stop(args) -> int:
    stopped = submit_mod.stop(args.address, args.id)
    print(f"{args.id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise InputError(f"--pc-fractions must be comma-separated numbers in [0, 1], got {text!r}")
    return values


def cmd_ground(args) -> int:
    from repscope.jobs.ground import run_ground
    from repscope.jobs.ground_tables import plain
    from repscope.jobs.spec import load_spec

    spec = load_spec(args.spec)
    summary = run_ground(
        spec, args.scores, args.out, fractions=_fractions(args.pc_fractions),
        replicates=args.bootstrap, permutations=args.permutations, shards=args.shards,
        seed=args.seed, address=args.address)
    if args.json:
        print(json.dumps(summary, default=plain))
    else:
        for test, files in summary["files"].items():
            print(f"{test}: {', '.join(files)}")
    return 0


def register_ground(subparsers) -> None:
    from repscope.jobs.ground import DEFAULT_FRACTIONS

    p = subparsers.add_parser(
        "ground", help="the seed paper's statistical tests (PC deletion, rank correlation with "
        "function, seed specificity, bootstrap intervals, permutation null)")
    p.add_argument("spec", help="job spec (YAML): store, models, layers, metrics, rows")
    p.add_argument("--scores", required=True, help="CSV 'model,score' (larger = better)")
    p.add_argument("--out", default="ground-output", help="folder for tables and plots")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--pc-fractions", default=",".join(str(f) for f in DEFAULT_FRACTIONS),
                   help="fractions of principal directions to delete")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap replicates (0: off)")
    p.add_argument("--permutations", type=int, default=10,
                   help="row shuffles per unit pair for the null (0: off)")
    p.add_argument("--shards", type=int, default=20, help="row shards the bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="random seed of the permutation null")
    _address(p)
    p.set_defaults(func=cmd_ground)


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="run a job spec on Ray and write its results store",
        description="Run a job spec: compare every unit (model, layer) of the spec with every "
        "other on Ray (an embedded local instance unless --address or RAY_ADDRESS names a "
        "cluster) and write the similarity matrices to the spec's output, replacing it "
        "atomically. Exit 2 for bad input, 1 for runtime failures.")
    p.add_argument("spec", help="job spec (YAML)")
    _address(p)
    p.add_argument("--json", action="store_true", help="last line of stdout: a JSON summary")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output that holds results of a different spec")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("nightly", help="incremental run: compute only pairs with new or "
                       "changed units, reuse the rest, keep a dated snapshot")
    p.add_argument("spec", help="job spec (YAML), as for run")
    _address(p)
    p.add_argument("--json", action="store_true", help="last line of stdout: a JSON summary")
    p.add_argument("--overwrite", action="store_true",
                   help="start anew when the output holds results of a different spec")
    p.set_defaults(func=cmd_nightly)

    p = sub.add_parser(
        "show", help="print a results store's matrices, model-pair blocks",
        description="Print every model-pair block of each metric (rows: layers of the first "
        "model, columns: layers of the second); with bootstrap bounds in the results, each "
        "cell is 'value [lower, upper]'.")
    p.add_argument("results", help="results store URL")
    p.add_argument("--metric", help="only this metric")
    p.add_argument("--json", action="store_true",
                   help="print JSON instead: units, and per metric its direction, values "
                   "(units x units) and, with bounds, lower, upper and confidence_level")
    storage_option_arg(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser(
        "report", help="write PNG heatmaps and an interactive HTML page of a results store",
        description="Write into --out: PNG heatmaps per model pair and metric (and per pair "
        "with the metrics side by side), trend plots for a series of checkpoints, and "
        "report.html, one self-contained page that works offline (docs/report.md). Files "
        "that repscope did not write are never replaced.")
    p.add_argument("results", help="results store URL")
    p.add_argument("--out", required=True, help="folder for the report files")
    p.add_argument("--metric", help="only this metric")
    p.add_argument("--scale", choices=report_mod.SCALES, default="natural",
                   help="heatmap colours: natural (default) = the metric's own range "
                   "(similarities [0, 1], procrustes [0, 2]), comparable across pairs and "
                   "runs; auto = each heatmap's own values' range")
    p.add_argument("--png", action="store_true", help="only the PNG files")
    p.add_argument("--html", action="store_true", help="only report.html")
    p.add_argument("--ground", metavar="DIR",
                   help="a `repscope ground --out` folder: add its tables to report.html")
    storage_option_arg(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("submit", help="submit a job spec to a Ray cluster (Ray Jobs API)")
    p.add_argument("spec", help="job spec (YAML)")
    _address(p, required=True)
    p.add_argument("--wait", action="store_true", help="follow the logs; exit 1 if it fails")
    p.add_argument("--submission-id", help="idempotent id: resubmitting it does nothing")
    p.add_argument("--nightly", action="store_true",
                   help="run `repscope nightly` (incremental) instead of `repscope run`")
    p.add_argument("--overwrite", action="store_true",
                   help="let the job replace an output that holds results of a different spec")
    p.set_defaults(func=cmd_submit)

    for name, func, text in (
        ("status", cmd_status, "state of a submitted job"),
        ("logs", cmd_logs, "logs of a submitted job"),
        ("stop", cmd_stop, "stop a submitted job"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("id", help="submission id printed by submit")
        _address(p, required=True)
        if name == "status":
            p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)

    register_ground(sub)
