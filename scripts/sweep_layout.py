"""The seed's sweep layout on Ray, run for a few steps, and the full sweep's wall time extrapolated
from it (issue 18; docs/phase3.md, "Sweep across GPUs / a cluster"). Same flags as `jaxhack sweep`
(defaults here: --backend ray, --hack-threshold 0 so the ceiling's vanilla wave always lets the rest
run in a layout measurement) plus --results, --full-steps, --seed-hours. Appends one JSON line
(placement of every run, measured step times, the estimate vs the seed's 65 h sequential) to
--results and prints it.

    # CPU, 8 fake XLA devices as 8 GPU slots (a check of placement and of the arithmetic)
    python scripts/sweep_layout.py --fake-devices 8 --steps 2 --eval-every 0 --out /tmp/layout \
        --results docs/results/sweep_layout_cpu.jsonl
    # one node of 8 GPUs: full preset at Qwen3-4B shapes, 2 steps per run (rerun to resume if cut off)
    python scripts/sweep_layout.py --preset full --ckpt random-4b --svd-random-bases --v-hack random \
        --steps 2 --eval-every 0 --out /tmp/layout --results docs/results/sweep_layout_8gpu.jsonl
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from jaxhack.commands import guarded, make_parser  # noqa: E402
from jaxhack.commands import sweep as sweep_command  # noqa: E402
from jaxhack.rl.sweep_estimate import SEED_SEQUENTIAL_HOURS, extrapolate  # noqa: E402


def main(argv=None) -> int:
    parser = make_parser(sweep_command, prog="sweep_layout.py")
    parser.description = __doc__
    parser.add_argument("--results", type=Path, default=None, help="append the JSON line here")
    parser.add_argument("--full-steps", type=int, default=200, help="steps of a full run")
    parser.add_argument("--seed-hours", type=float, default=SEED_SEQUENTIAL_HOURS,
                        help="the seed's sequential sweep time to compare with")
    parser.set_defaults(backend="ray", hack_threshold=0.0)
    args = parser.parse_args(argv)
    args._command = "sweep"
    status = guarded(sweep_command.run, args)
    if status != 0:
        return status
    summary = json.loads((args.out / "summary.json").read_text())
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv[1:] if argv is None else argv,
              "preset": args.preset,
              "platform": summary["runs"][0]["placement"][-1]["platform"],
              "device_kind": summary["runs"][0]["placement"][-1].get("device_kind"),
              "gpus_per_run": summary["ray"]["gpus_per_run"], "fake_devices": summary["ray"]["fake_devices"],
              **extrapolate(summary, args.full_steps, args.seed_hours)}
    line = json.dumps(record, sort_keys=True)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a") as f:
            f.write(line + "\n")
    print(f"layout: {record['runs']} runs, {record['concurrent_runs']} at a time, waves {record['waves']}; "
          f"full {args.full_steps}-step sweep ~ {record['sweep_wall_h_ceiling_waves']:.2f} h "
          f"(one run {record['full_run_h_max']:.2f} h; sequential {record['sequential_h_measured']:.2f} h; "
          f"seed {args.seed_hours:g} h sequential)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
