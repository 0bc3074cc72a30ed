"""Phase 3 sweep on Ray (`jaxhack sweep --backend ray`; docs/phase3.md, "Sweep across GPUs / a
cluster"): each (arm, seed) run is one Ray task on its own worker process, placed by Ray on
`gpus_per_run` GPUs (CUDA_VISIBLE_DEVICES set by Ray), on a local Ray started here or an existing
cluster (`address`). `ray` is imported lazily: without it, `import_ray` raises ImportError(RAY_MISSING).

Same run directories, done markers, cost ceiling and summary as the sequential backend
(`jaxhack.rl.sweep`):
- resume: a run with RUN/done.json is skipped; an unfinished one resumes from its last checkpoint
  (the trainer is called with resume=True), in whichever worker it lands;
- a failed attempt (the task raised, or its worker process died) is retried once (`max_attempts`
  2), resuming from the run's checkpoint; a run that fails every attempt is reported in the summary
  ("failed") and the other runs go on; rerunning the sweep resumes it;
- cost ceiling across workers: with it on, the first `ceiling_seeds` seeds of the first arm run as
  wave 1; the verdict (`sweep.ceiling_verdict`) decides whether the rest (wave 2) is submitted at
  all. A wave-1 run that failed stops the sweep too (the ceiling cannot be evaluated).
- placement: each attempt appends {host, node, pid, gpu ids, slots, jax device} to
  RUN/placement.jsonl; the summary's runs carry them ("placement").
- progress: while runs are in flight the driver re-reads every RUN/metrics.jsonl and prints one
  line per run (arm, seed, state, step, policy hack rate, device) when something changed.

Without GPUs, `fake_devices=N` treats each of N fake XLA host devices as a GPU slot: Ray gets a
custom resource SLOT_RESOURCE=N, the workers XLA_FLAGS=--xla_force_host_platform_device_count=N,
and the driver hands every task distinct slot indices (its run computes on jax.devices()[slot]).

Fault injection (tests, and checking a cluster's retry path): `faults` {(arm, seed): Fault} or the
env var FAULT_ENV = "ARM:SEED:STEP[:TIMES[:MODE]],...": the first TIMES (1) attempts of that run
train STEP steps and then raise (MODE "raise") or kill the worker process (MODE "exit").
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from jaxhack.io import read_jsonl
from jaxhack.rl.config import TrainConfig

# the driver's imports (jaxhack.rl.sweep pulls in the trainer and scipy) are deferred to the
# functions that need them, so a worker running a fake trainer starts lighter
DEFAULT_CEILING_METRIC = "train_hack_rate_max_windowed"  # == jaxhack.rl.sweep.DEFAULT_CEILING_METRIC

RAY_MISSING = "--backend ray needs ray, which is not installed: pip install -e '.[ray]'"
SLOT_RESOURCE = "jaxhack_slot"
FAULT_ENV = "JAXHACK_SWEEP_FAULT"
FAULT_FILE, PLACEMENT_FILE, WORKER_LOG = "fault_attempts", "placement.jsonl", "worker.log"
REPO_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the jaxhack package


def import_ray():
    """The ray module, or ImportError(RAY_MISSING) (one line naming the extra to install)."""
    try:
        import ray
    except ImportError:
        raise ImportError(RAY_MISSING) from None
    return ray


class Fault(NamedTuple):
    step: int           # steps trained by the faulty attempt before it fails
    times: int = 1      # attempts that fail (counted in RUN/fault_attempts)
    mode: str = "raise"  # "raise": the task raises; "exit": the worker process dies (os._exit)


class InjectedFault(RuntimeError):
    pass


def parse_faults(text: str | None) -> dict:
    """"ARM:SEED:STEP[:TIMES[:MODE]],..." -> {(arm, seed): Fault}; ValueError when malformed."""
    faults = {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        parts = item.split(":")
        try:
            if not 3 <= len(parts) <= 5:
                raise ValueError
            times, mode = (int(parts[3]) if len(parts) > 3 else 1), (parts[4] if len(parts) > 4 else "raise")
            fault = Fault(int(parts[2]), times, mode)
            if fault.mode not in ("raise", "exit") or fault.step < 0 or fault.times < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"{FAULT_ENV} item {item!r}: expected ARM:SEED:STEP[:TIMES[:raise|exit]]") from None
        faults[(parts[0], int(parts[1]))] = fault
    return faults


def mesh_devices(spec: str | None) -> int:
    """Devices of one run's mesh spec "axis=n[,axis=n]" (e.g. "data=4,fsdp=2" -> 8); 1 without one."""
    size = 1
    for item in filter(None, (x.strip() for x in (spec or "").split(","))):
        size *= int(item.partition("=")[2])
    return size


def enable_compile_cache(path: str | Path | None) -> None:
    """JAX persistent compilation cache in `path` (shared by the runs of a sweep and its workers:
    the first worker compiles, the others load). None: leave JAX's setting alone."""
    if path is None:
        return
    import jax

    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# ---- the task (runs in a Ray worker) --------------------------------------------------------------

def _take_fault(run_dir: Path, fault: Fault | None) -> bool:
    """True when this attempt must fail (and counts it in RUN/fault_attempts)."""
    if fault is None:
        return False
    path = run_dir / FAULT_FILE
    used = int(path.read_text()) if path.is_file() else 0
    if used >= fault.times:
        return False
    path.write_text(str(used + 1))
    return True


def _placement(slots: Sequence[int] | None) -> dict:
    import jax
    import ray

    devices = jax.devices()
    mine = [devices[i] for i in slots] if slots else devices
    ctx = ray.get_runtime_context()
    return {"host": socket.gethostname(), "node_id": ctx.get_node_id()[:12], "worker_id": ctx.get_worker_id()[:12],
            "pid": os.getpid(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "slots": list(slots or []),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "platform": mine[0].platform,
            "device_kind": mine[0].device_kind,
            "devices": [str(d) for d in mine], "n_process_devices": len(devices), "time": time.time()}


def run_task(cfg_dict: dict, attempt: int, fault: Fault | None, compile_cache: str | None,
             slots: list[int] | None, train_fn: Callable | None, tracking_kw: dict | None = None) -> dict:
    """One attempt of one run (the body of the Ray task): stdout/stderr go to RUN/worker.log, the
    placement to RUN/placement.jsonl; returns {"summary", "placement", "wall_s"}."""
    import jax

    cfg = TrainConfig(**cfg_dict)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(run_dir / WORKER_LOG, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        enable_compile_cache(compile_cache)
        placement = {"attempt": attempt, **_placement(slots)}
        with open(run_dir / PLACEMENT_FILE, "a") as f:
            f.write(json.dumps(placement, sort_keys=True) + "\n")
        print(f"[sweep worker] attempt {attempt}: {json.dumps(placement, sort_keys=True)}", flush=True)
        device = jax.default_device(jax.devices()[slots[0]]) if slots else contextlib.nullcontext()
        with device:
            if _take_fault(run_dir, fault):
                if train_fn is None:
                    from jaxhack.rl.trainer import train
                    train(cfg, resume=True, stop_after=fault.step, progress=False)
                print(f"[sweep worker] injected fault ({fault.mode}) after {fault.step} step(s)", flush=True)
                if fault.mode == "exit":
                    log.flush()
                    os._exit(17)
                raise InjectedFault(f"injected fault after {fault.step} step(s) ({FAULT_ENV})")
            if train_fn is None:
                from jaxhack.rl.trainer import train
                summary = train(cfg, resume=True, progress=False, **(tracking_kw or {}))
            else:
                summary = train_fn(cfg, resume=True, model=None)
    return {"summary": summary, "placement": placement, "wall_s": time.time() - t0}


# ---- the driver -----------------------------------------------------------------------------------

def echo(text: str) -> None:
    """The default log: print and flush (progress must show up in a redirected log file)."""
    print(text, flush=True)


def _one_line(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def run_progress(run_dir: Path) -> tuple[int, float | None]:
    """(steps done, policy hack rate of the last step) from RUN/metrics.jsonl (a half-written
    last line is ignored)."""
    try:
        records = read_jsonl(Path(run_dir) / "metrics.jsonl")  # jaxhack.rl.run.METRICS_FILE
    except (OSError, ValueError):
        records = []
    if not records:
        return 0, None
    return records[-1]["step"] + 1, records[-1].get("hack_rate_policy")


class Board:
    """Prints the per-run progress lines when they changed (redrawn in place on a terminal)."""

    def __init__(self, log: Callable[[str], None], every_s: float):
        self.log, self.every_s, self.last, self.last_t, self.drawn = log, every_s, None, 0.0, 0
        self.tty = log is echo and sys.stdout.isatty()

    def show(self, lines: list[str], force: bool = False) -> None:
        body = "\n".join(lines)
        if body == self.last or (not force and time.time() - self.last_t < self.every_s):
            return
        if self.tty and self.drawn:
            sys.stdout.write(f"\x1b[{self.drawn}F\x1b[J")
        self.log(f"[sweep {time.strftime('%H:%M:%S')}]\n{body}")
        self.last, self.last_t, self.drawn = body, time.time(), len(lines) + 1


PATH_FIELDS = ("ckpt", "tokenizer", "problems", "eval_problems", "mix_teacher", "v_hack")


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its relative file / directory fields made absolute (workers may have another cwd)."""
    fixed = {f: str(Path(getattr(cfg, f)).resolve()) for f in PATH_FIELDS
             if getattr(cfg, f) and not Path(getattr(cfg, f)).is_absolute() and Path(getattr(cfg, f)).exists()}
    return dataclasses.replace(cfg, **fixed) if fixed else cfg


def _connect(ray, address: str | None, num_cpus: int | None, fake_devices: int) -> bool:
    """Attach to a running Ray (already initialized here, or `address`), else start a local one;
    True when started here (then shut down at the end)."""
    if ray.is_initialized():
        return False
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        if address:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=num_cpus,  # a new Ray even if another runs here
                     resources={SLOT_RESOURCE: fake_devices} if fake_devices else None,
                     include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    except Exception as err:  # ray raises bare Exceptions for a node that does not come up
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise ConnectionError(f"could not start or reach {where}: {_one_line(err)}") from None
    return True
    ray.init(num_cpus=num_cpus, resources={SLOT_RESOURCE: fake_devices} if fake_devices else None,
             include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    return True


@dataclasses.dataclass
class _Sweep:
    """Driver state of one Ray sweep: the run records and the slot pool (fake devices)."""
    ray: object
    remote: object
    base: TrainConfig
    out: Path
    faults: dict
    compile_cache: str | None
    train_fn: Callable | None
    tracking: object | None  # TrackingSettings of the sweep (None: no trackers)
    slot_size: int          # slots per run with fake devices, else 0 (Ray places GPUs)
    free_slots: list
    max_attempts: int
    board: Board
    records: dict = dataclasses.field(default_factory=dict)

    def record(self, arm: str, seed: int) -> dict:
        from jaxhack.rl.sweep import run_dir_for

        key = (arm, seed)
        if key not in self.records:
            self.records[key] = {"arm": arm, "seed": seed, "run_dir": str(run_dir_for(self.out, arm, seed)),
                                 "status": "queued", "state": "queued", "finished": False, "failed": False,
                                 "summary": None, "attempts": 0, "errors": [], "placement": [], "wall_s": 0.0}
        return self.records[key]

    def lines(self) -> list[str]:
        out = []
        for r in self.records.values():
            if r["state"] == "running":
                self._refresh_placement(r)
            step, hack = run_progress(Path(r["run_dir"]))
            where = r["placement"][-1]["devices"][0] if r["placement"] else ""
            attempt = f" attempt {r['attempts']}" if r["attempts"] > 1 else ""
            out.append(f"  {r['arm']} seed {r['seed']}: {r['state']}{attempt} step {step}/{self.base.steps} "
                       f"hack {'-' if hack is None else f'{hack:.3f}'} {where}".rstrip())
        return out

    def _refresh_placement(self, r: dict) -> None:
        path = Path(r["run_dir"]) / PLACEMENT_FILE
        r["placement"] = read_jsonl(path) if path.is_file() else []

    def run_wave(self, keys: Sequence[tuple[str, int]]) -> None:
        from jaxhack.rl.sweep import read_done

        queue = deque()
        for arm, seed in keys:
            r = self.record(arm, seed)
            done = read_done(Path(r["run_dir"]))
            if done is not None:
                r.update(status="skipped (done)", state="done", finished=True, summary=done)
                self._refresh_placement(r)
            else:
                queue.append((arm, seed))
        inflight: dict = {}
        try:
            self._drain(queue, inflight)
        except BaseException:  # Ctrl-C or a driver bug: stop the runs still going (they resume later)
            for ref in inflight:
                self.ray.cancel(ref, force=True)
            raise

    def _drain(self, queue: deque, inflight: dict) -> None:
        from jaxhack.rl.run import RUN_FILE
        from jaxhack.rl.sweep import run_config, tracking_kwargs

        while queue or inflight:
            while queue and (not self.slot_size or len(self.free_slots) >= self.slot_size):
                key = queue.popleft()
                r = self.records[key]
                slots = [self.free_slots.pop(0) for _ in range(self.slot_size)] or None
                r["attempts"] += 1
                r["resumed"] = r.get("resumed", (Path(r["run_dir"]) / RUN_FILE).is_file())
                r["state"] = "running"
                cfg = run_config(self.base, self.out, *key)
                ref = self.remote.remote(cfg.to_dict(), r["attempts"], self.faults.get(key), self.compile_cache,
                                         slots, self.train_fn, tracking_kwargs(self.tracking, self.out, *key))
                inflight[ref] = (key, slots, time.time())
            ready, _ = self.ray.wait(list(inflight), num_returns=1, timeout=self.board.every_s)
            for ref in ready:
                key, slots, t0 = inflight.pop(ref)
                self.free_slots.extend(slots or [])
                self._finish(ref, key, t0, queue)
            self.board.show(self.lines())

    def _finish(self, ref, key, t0: float, queue: deque) -> None:
        from jaxhack.rl.sweep import read_done

        r = self.records[key]
        r["wall_s"] += time.time() - t0
        self._refresh_placement(r)
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayError as err:  # the task raised, or its worker process died
            r["errors"].append(f"attempt {r['attempts']}: {_one_line(err)}")
            if r["attempts"] < self.max_attempts:
                r["state"] = "retrying"
                self.board.log(f"[sweep] {key[0]} seed {key[1]} failed ({r['errors'][-1]}); retrying")
                queue.appendleft(key)
            else:
                r.pop("resumed", None)
                r.update(state="failed", failed=True, status=f"failed after {r['attempts']} attempt(s): "
                         + " | ".join(r["errors"]))
                self.board.log(f"[sweep] {key[0]} seed {key[1]}: {r['status']}")
            return
        done = read_done(Path(r["run_dir"]))
        r.update(summary=done or result["summary"], finished=done is not None, state="done")
        status = "resumed" if r.pop("resumed") else "ran"
        if r["attempts"] > 1:
            status += f" (retried after {r['errors'][-1]})"
        r["status"] = f"{status} in {r['wall_s']:.0f}s"
        self.board.log(f"[sweep] {key[0]} seed {key[1]}: {r['status']}")


def run_sweep_ray(base: TrainConfig, out: str | Path, arms: Sequence[str], seeds: Sequence[int], *,
                  address: str | None = None, num_cpus: int | None = None, gpus_per_run: float | None = None,
                  cpus_per_run: float = 1.0, fake_devices: int = 0, ceiling: bool = True, ceiling_seeds: int = 3,
                  hack_threshold: float = 0.1, ceiling_metric: str = DEFAULT_CEILING_METRIC,
                  compile_cache: str | Path | None = None, faults: dict | None = None,
                  train_fn: Callable | None = None, max_attempts: int = 2, progress_every: float = 10.0,
                  log: Callable[[str], None] = echo, tracking=None) -> dict:
    """The sweep of `sweep.run_sweep` with each run a Ray task; returns its dict plus "failed"
    (records of runs that failed every attempt) and "waves".

    gpus_per_run: GPUs (or fake-device slots) per run; None: the mesh's device count
    (`base.mesh`, when TrainConfig has it) where the cluster has GPUs or fake_devices > 0, else 0
    (CPU runs, `cpus_per_run` CPUs each). train_fn(cfg, resume=True, model=None) replaces the
    trainer (tests; it must be picklable)."""
    from jaxhack.rl.sweep import STOPPED_FILE, ceiling_applies, ceiling_verdict, check_sweep, finish_sweep

    check_sweep(arms, seeds)
    ray = import_ray()
    base = absolute_paths(base)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / STOPPED_FILE).unlink(missing_ok=True)
    t_start = time.time()
    started = _connect(ray, address, num_cpus, fake_devices)
    try:
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        if gpus_per_run is None:
            gpus_per_run = mesh_devices(getattr(base, "mesh", None)) if (gpus or fake_devices) else 0
        options = dict(num_cpus=cpus_per_run, max_retries=0)
        if fake_devices:
            if resources.get(SLOT_RESOURCE, 0) < fake_devices:
                raise ValueError(f"fake_devices={fake_devices} needs a Ray with resource {SLOT_RESOURCE}>="
                                 f"{fake_devices} (start Ray here: no --ray-address)")
            if gpus_per_run != int(gpus_per_run) or not 1 <= gpus_per_run <= fake_devices:
                raise ValueError(f"--gpus-per-run {gpus_per_run}: with {fake_devices} fake devices expected "
                                 f"an integer in [1, {fake_devices}]")
            options.update(num_cpus=0, resources={SLOT_RESOURCE: int(gpus_per_run)}, runtime_env={"env_vars": {
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={fake_devices}", "JAX_PLATFORMS": "cpu"}})
            slots_total = fake_devices // int(gpus_per_run)
        elif gpus_per_run:
            if gpus_per_run > gpus:
                raise ValueError(f"--gpus-per-run {gpus_per_run}: the Ray cluster has {gpus:g} GPU(s)")
            options["num_gpus"] = gpus_per_run
            slots_total = int(gpus // gpus_per_run)
        else:
            slots_total = int(resources.get("CPU", 1) // max(cpus_per_run, 1e-9))
        sweep = _Sweep(ray=ray, remote=ray.remote(run_task).options(**options), base=base, out=out,
                       faults=dict(faults or {}), compile_cache=None if compile_cache is None else str(compile_cache),
                       train_fn=train_fn, tracking=tracking, slot_size=int(gpus_per_run) if fake_devices else 0,
                       free_slots=list(range(fake_devices - fake_devices % max(int(gpus_per_run), 1))),
                       max_attempts=max_attempts, board=Board(log, progress_every))
        for arm in arms:
            for seed in seeds:
                sweep.record(arm, seed)  # the board lists every planned run
        plan = [(arm, seed) for arm in arms for seed in seeds]
        n_check = min(ceiling_seeds, len(seeds))
        waves = [plan[:n_check], plan[n_check:]] if ceiling_applies(ceiling, arms) else [plan]
        log(f"[sweep] ray backend: {len(plan)} runs, {slots_total} at a time ({gpus_per_run:g} "
            f"{'fake device' if fake_devices else 'GPU' if gpus_per_run else 'CPU-only run'}(s) per run), "
            f"waves {[len(w) for w in waves]}; cluster {dict(sorted(resources.items()))}")
        stopped, reason = False, ""
        sweep.run_wave(waves[0])
        if len(waves) > 1:
            first = [sweep.records[k] for k in waves[0]]
            failed = [f"{r['arm']} seed {r['seed']}" for r in first if not r["finished"]]
            if failed:
                stopped, reason = True, (f"cost ceiling not evaluated: wave 1 run(s) {failed} failed, so the other "
                                         f"arms were not started; rerun the same command to resume them")
            else:
                stopped, reason = ceiling_verdict(first, arms, hack_threshold, ceiling_metric)
            if stopped:
                for key in waves[1]:
                    sweep.records.pop(key)
            else:
                sweep.run_wave(waves[1])
        sweep.board.show(sweep.lines(), force=True)
        ray_info = {"address": address or "local", "resources": resources, "gpus_per_run": gpus_per_run,
                    "fake_devices": fake_devices, "concurrent_runs": slots_total,
                    "waves": [[list(k) for k in w] for w in waves], "sweep_wall_s": time.time() - t_start}
    finally:
        if started:
            ray.shutdown()
    runs = list(sweep.records.values())
    for r in runs:
        r.pop("state", None)
    failed = [r for r in runs if r["failed"]]
    failed_info = [{"arm": r["arm"], "seed": r["seed"], "errors": r["errors"]} for r in failed]
    result = finish_sweep(out, arms, seeds, runs, stopped, reason, hack_threshold, ceiling_metric, log,
                          extra={"backend": "ray", "ray": ray_info, "failed": failed_info})
    return {**result, "failed": failed, "waves": ray_info["waves"]}
