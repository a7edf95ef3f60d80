"""Rehearse a config here before a GPU cluster runs it: the same stages and Ray resource requests on logical GPUs.

Runs the whole pipeline, a Ray Data grid and the Serve app of ``--config`` in a private local Ray that declares the
config's GPUs as logical ones, with tiny stand-ins behind its hub models and dataset and every budget cut to a step
or two (mage_ray/rehearse.py says exactly what changes). A model placed on ``cuda`` in a process to which Ray gave
no GPU fails the rehearsal with one line naming the stage, the process and the model. Prints per stage what was
requested from Ray, what Ray assigned and which models went on a GPU, then the stages that would hold a GPU idle;
writes rehearsal.md / rehearsal.json to ``--out``.

    mage-ray rehearse --config configs/hh_rlhf.yaml
    mage-ray rehearse --config configs/summary.yaml --gpus 8 --cpus 96 --out /tmp/rehearse-summary
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument(
        "--out",
        default=None,
        help="where the rehearsal writes (default: <tmp>/mage_ray-rehearsal/<run_name>)",
    )
    parser.add_argument(
        "--gpus", type=int, default=None, help="logical GPUs of the node (default: the largest request)"
    )
    parser.add_argument(
        "--cpus", type=int, default=None, help="logical CPUs of the node (default: the largest request + 4)"
    )
    parser.add_argument("--no-serve", action="store_true", help="skip the Serve stage")
    parser.add_argument("--no-grid", action="store_true", help="skip the Ray Data grid stage")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep --out's run: finished stages are skipped, as a resumed job's",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="cut every Ray Train run to this many workers (of the config's shape; default: the config's count)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="where the run's artifacts go (default <out>/runs); an s3:// or gs:// URI rehearses the object store",
    )
    # the config's own storage, hub models and data are replaced: only the config itself (and its reference point)
    parser.set_defaults(checks=("ref_point",))


def run(args, cfg) -> int:
    import signal
    import sys
    import tempfile
    from pathlib import Path

    from mage_ray.rehearse import RehearsalFailed, rehearse

    out = args.out or str(Path(tempfile.gettempdir()) / "mage_ray-rehearsal" / cfg.storage.run_name)

    def stop(signum, frame):  # SIGTERM (kill, a CI timeout): unwind, so the rehearsal's own Ray is shut down
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        report = rehearse(
            args.config,
            args.overrides,
            out=out,
            cpus=args.cpus,
            gpus=args.gpus,
            serve_app=not args.no_serve,
            grid=not args.no_grid,
            resume=args.resume,
            storage=args.storage,
            workers=args.workers,
        )
    except RehearsalFailed as e:
        print(f"report: {out}/rehearsal.md", flush=True)
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"rehearsal passed in {report['seconds']:.0f} s; report: {out}/rehearsal.md", flush=True)
    return 0
