"""Command line:

    python -m ltsearch train CONFIG.yaml [--set key=value ...] [--out DIR] [--resume]
    python -m ltsearch report EXPERIMENT_DIR_OR_URI [--no-png]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import ConfigError, dump_config, load_config
from .data import DataError


def _train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    out = Path(args.out or Path("runs") / time.strftime(f"{Path(args.config).stem}-%Y%m%d-%H%M%S"))
    checkpoint = out / "checkpoint"
    if args.resume and not checkpoint.exists():
        raise ConfigError(f"--resume: {checkpoint} holds no checkpoint to resume from")
    out.mkdir(parents=True, exist_ok=True)
    dump_config(config, out / "config.yaml")

    from .train import train

    started = time.perf_counter()
    summary = train(config, out_dir=out, progress=True, resume_from=checkpoint if args.resume else None)
    summary["wall_time_s"] = time.perf_counter() - started
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    for stage in ("stage1", "stage2"):
        if stage in summary:
            best = summary[stage]["best"]
            nan = float("nan")  # a dataset without a val or test split (an image folder without test/)
            print(f"{stage}: best epoch {summary[stage]['best_epoch']} by val: val_acc {best.get('val_acc', nan):.2f}"
                  f"  test_acc {best.get('test_acc', nan):.2f}  (tau-norm test_acc {best.get('tau_test_acc', nan):.2f})")
    print(f"wrote {out / 'metrics.json'} and {out / 'config.yaml'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .analysis import NoSuccessfulTrialError, write_report
    from .storage import StorageError

    try:
        write_report(args.experiment, png=not args.no_png)
    except (OSError, StorageError, NoSuccessfulTrialError) as err:  # OSError: a store that refused the read
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltsearch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train one configuration (no Ray)")
    p.add_argument("config", help="experiment YAML (sections data, model, stage1, stage2, posthoc, trainer)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. stage1.weight_decay=5e-3")
    p.add_argument("--out", help="output directory (default runs/<config>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint")
    p.set_defaults(func=_train)
    p = commands.add_parser("report", help="write report.html and figures/*.png of a finished search")
    p.add_argument("experiment", help="experiment folder written by run_search.py (holds results.csv), or its "
                                      "URI in object storage (s3://bucket/prefix/NAME)")
    p.add_argument("--no-png", action="store_true", help="skip the PNGs (they need kaleido and a Chromium)")
    p.set_defaults(func=_report)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
