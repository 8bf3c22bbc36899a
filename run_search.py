"""Search long-tailed regularisation hyperparameters with Ray Tune + Optuna + ASHA.

    python run_search.py search_spaces/quickstart.yaml                 # local Ray, started in-process
    python run_search.py search_spaces/wd_maxnorm.yaml --address 10.0.0.1:6379 --storage /shared/runs
    python run_search.py search_spaces/wd_maxnorm.yaml --storage s3://bucket/ltsearch   # object storage
    python run_search.py search_spaces/quickstart.yaml --name qs --resume   # continue an interrupted run
"""
import argparse
import sys

from ltsearch.config import ConfigError
from ltsearch.data import DataError
from ltsearch.space import load_search_space


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("space", help="search-space YAML (sections base, space, search)")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--dashboard-host", default="127.0.0.1",
                        help="interface a local Ray's dashboard listens on (default: loopback only)")
    parser.add_argument("--storage", default="runs",
                        help="experiments folder (shared, e.g. NFS, on several nodes) or object-storage URI "
                             "(s3://bucket/prefix, gs://..., abfs://...)")
    parser.add_argument("--name", help="experiment name (default: <space>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the experiment --name")
    parser.add_argument("--num-samples", type=int, help="override search.num_samples")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override base (stage1.epochs=3) or search (search.num_samples=4) values")
    args = parser.parse_args(argv)
    try:
        spec = load_search_space(args.space, args.set, args.num_samples)
        from ltsearch.search import run_search  # imports Ray: only after the input is known to be valid

        result = run_search(spec, storage=args.storage, name=args.name, address=args.address,
                            dashboard_host=args.dashboard_host, resume=args.resume, source=args.space)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ConnectionError as err:
        where = args.address or "$RAY_ADDRESS"
        print(f"error: --address: cannot reach the Ray cluster at {where}: {str(err).strip().splitlines()[0]}",
              file=sys.stderr)
        return 2
    best = result.best
    metric = spec.search.metrics[0]
    trials = result.results
    searched = int((trials["phase"] != "confirm").sum()) if "phase" in trials else len(trials)
    print(f"\n{searched} trials in {result.path}")
    if best:
        interval = (f", 95% interval {best['objective_lo']:.1f}-{best['objective_hi']:.1f}"
                    if "objective_lo" in best else "")
        print(f"best trial {best['trial_id']} by {metric} = {best['objective']:.2f} (validation{interval}): "
              f"val_acc {best.get('final_val_acc', float('nan')):.2f}, "
              f"test_acc {best.get('final_test_acc', float('nan')):.2f} (test: reported, never used to select)")
        confirmed = best.get("confirmed")
        if confirmed:
            print(f"  chosen by confirmation: mean {metric} {confirmed['mean_objective']:.2f} over seeds "
                  f"{confirmed['seeds']} (validation), mean test_acc "
                  f"{confirmed.get('mean_test_acc', float('nan')):.2f} (reported)")
        print("  " + ", ".join(f"{k}={best[k]}" for k in spec.space if k in best))
    from ltsearch.search.results import stage_summary

    for line in stage_summary(trials, spec.search):
        print(line)
    print(f"results: {result.path / 'results.csv'}; best config: {result.path / 'best_config.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
