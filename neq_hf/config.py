"""Configuration of neuronal-equilibrium (NEq) freezing."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

UNIT_KINDS = ("heads", "neurons")
CRITERIA = ("relative", "absolute")
TOKEN_POOLING = ("mean", "none")
GRANULARITIES = ("auto", "unit", "layer")
# The spellings HfArgumentParser accepts on the command line.
_TRUE = ("true", "yes", "t", "y", "1")
_FALSE = ("false", "no", "f", "n", "0")


@dataclass
class NEqConfig:
    r"""
    Settings of NEq freezing (Bragagnolo et al., "To update or not to update? Neurons at equilibrium in deep models",
    NeurIPS 2022), usable on the command line through [`~transformers.HfArgumentParser`].

    Parameters:
        > Equilibrium criterion

        criterion (`str`, defaults to `"relative"`):
            `"absolute"`: the paper's rule, a unit is at equilibrium when `|v| < eps`. `"relative"`: the same rule
            measured in units of how much the fastest-moving layer changes at the same check, so that it does not
            depend on the learning rate, its schedule, the check interval or the method (full fine-tuning, LoRA), and
            cannot freeze the whole model: see `neq_hf.equilibrium`.
        eps (`float`, defaults to `1e-3`):
            Threshold of the `"absolute"` criterion: a unit is at equilibrium when `|v| < eps`.
        eps_relative (`float`, defaults to `0.1`):
            Threshold of the `"relative"` criterion: a unit is at rest when its change and its velocity are below
            this fraction of the typical change of the fastest-moving layer at the same check.
        eps_relative_max (`float`, defaults to `3e-3`):
            Cap of the `"relative"` criterion's velocity threshold: a unit is at rest only when also `|v| <
            eps_relative_max`, an absolute limit of the paper's kind (3x its `eps`). It only ever makes the rule
            stricter: where the network moves slowly (LoRA, a small learning rate) `eps_relative x s` is far below it
            and changes nothing; where it moves fast it keeps the bottom layers from counting as at rest merely
            because the top moves faster still. Measured at twice the GLUE grid's learning rate (MiniLM, SST-2, ten
            seeds): without it the default lost 0.8 points to full fine-tuning, with it 0.4 (19% of the units frozen
            on average instead of 27%). It changed no decision on the GLUE grid, with LoRA, at half the learning rate
            or half the run length. Checks further apart see larger changes, so it binds in longer runs too: at twice
            the run length +0.3 instead of +0.1 (15% frozen on average instead of 27%), and on a 500-step run nothing
            froze where the uncapped rule froze the bottom layer in a burst at the first decision and lost 0.7 points
            (README, "Does the default hold in every regime?"). `0` removes it.
        mu (`float`, defaults to `0.5`):
            Momentum of the velocity: `v_t = dphi_t - mu * v_{t-1}`.
        warmup (`int`, defaults to `1`):
            Checks after the reference check during which no unit is frozen. At least 1: the velocity needs two
            similarities, so the first check after the reference can never decide.
        pin_frozen (`bool`, defaults to `False`):
            Keep a unit frozen for good once frozen. By default every check re-decides, so a frozen unit whose
            output starts moving again is released.

        layer_threshold (`float`, defaults to `0.9`):
            Structured freezing: a whole layer freezes when at least this fraction of its units is at equilibrium and
            every layer below it is frozen (so backward stops at it). `1.0` with `granularity="unit"` is per-unit
            freezing only. Lower values freeze sooner and save more, at a risk to accuracy in short runs (`0.5` lost
            10 points of SST-2 accuracy in a one-epoch run where `0.9` lost as much as freezing the bottom two layers
            from the start: README,
            "Does the default hold in every regime?").
        granularity (`str`, defaults to `"layer"`):
            What freezes: `"layer"`, only whole layers, from the bottom up, by `layer_threshold`: no partly frozen
            tensor, so no per-row gradient or optimizer bookkeeping; `"unit"`, every unit at equilibrium as well
            (and whole layers by `layer_threshold`), the paper's granularity; `"auto"`: `"layer"` for a model under
            100M parameters on a CUDA device, where that bookkeeping's host time costs more than scattered frozen rows
            save (MiniLM-L6 on an H200: 1.7-2.1x a plain step with 50-90% of rows frozen), else `"unit"` (BERT-base on
            the same card: 0.96x / 0.88x a plain step with 50% / 90% frozen at 128 tokens;
            `benchmarks/results/gpu_h200/`). `"layer"` is the default because per-unit freezing cost accuracy where
            whole bottom layers did not: on GLUE MRPC (MiniLM, two seeds) the same decisions lost 1.2 points of
            accuracy per unit and none whole-layer only (README, "Does the default hold in every regime?").
        min_loss_drop (`float`, defaults to `0.1`):
            Training-progress gate: no unit freezes before the training loss (mean over the last check interval) is
            this fraction below its start (mean of the first steps). Outputs also stop changing on a loss plateau at
            the start of training, where freezing would keep the model there. Once open, the gate stays open. `0`
            disables it. `NEqTrainer` sees every step's loss; `NEqTrainerCallback` only the logged ones
            (`logging_steps`).
        settle_fraction (`float`, defaults to `0`):
            Movement gate: no layer or unit newly freezes at a check where the network still moves more than this
            fraction of the most it has moved in the run, i.e. while `s_t > settle_fraction x max(s_1..s_t)`, with
            `s` the scale of the relative rule (the median `1 - phi` of the layer that moves most). The relative rule
            compares a unit with the fastest layer at the same check, so without this gate it finds the bottom
            layers "at rest" most easily at the checks where the top of the network moves most, in the middle of a
            burst of learning. A ratio of two scales, it does not depend on the learning rate or the check interval
            either. Decisions already taken stand (a frozen layer is not released by the gate). `0` disables it.
        checks_from_loss_drop (`float`, defaults to `0`):
            With the progress gate on, start the held-out checks (the reference outputs included) only once the
            training loss has dropped by this fraction from its start (at most `min_loss_drop`), instead of at step 0:
            checks made earlier only measure, and each one before a layer freezes is a forward pass of the whole
            model over the held-out split. The first decision needs the reference and two checks after it, so it
            comes at least two checks after the start. Measured (README, "Results"): `0.03` on the GLUE grid
            (MiniLM, 126 steps) skipped 2-4 of the 21 checks, took the same decisions and saved 0.8% of the CPU time;
            on the 500-step SST-2 run the loss fell by 10% within the first two check intervals, the first decision
            came at step 100 instead of 50, after the window in which layer 0 was at rest, and nothing froze at all.
            Hence off by default. No effect without the gate or when no training loss is known at a check.

        > Held-out split and schedule

        check_every (`str` or `int`, defaults to `"auto"`):
            When to run the held-out check: `"auto"` (every 5% of the run's optimizer steps, i.e. 20 checks, so that
            the velocity's scale does not depend on the length of the run and the first decision comes at 10% of
            it; fewer where they would cost more than `check_budget`), `"epoch"`, or a number of optimizer steps.
        check_budget (`float`, defaults to `0.25`):
            With `check_every="auto"`, space the checks so that their held-out forward passes cost at most this
            fraction of the training compute, estimated from sample counts: a check reads the held-out samples once
            (forward only), an optimizer step its `per_device_train_batch_size x gradient_accumulation_steps` samples
            about 3 times (forward and backward; 2 with LoRA, which computes no weight gradient of the base model).
            The interval is widened where 20 checks would cost more (a held-out split large against the training
            batch, or a short LoRA run: SmolLM2-135M with 64 held-out sentences and batches of 16 spent 41% of its
            time in checks every 3 steps), but never below 5 checks per run. `0` disables it. Needs the training
            batch (`NEqTrainer` and `NEqTrainerCallback` pass it; see `NEq.setup`).
        holdout_size (`float`, defaults to `0.01`):
            Size of the held-out split carved from the training set: a fraction in (0, 1), or a number of samples
            (>= 1; `1.0` is refused as ambiguous). Ignored when a held-out dataset is given explicitly.
        holdout_min_samples (`int`, defaults to `64`):
            Floor of the carved held-out split: a fractional `holdout_size` is raised to this many samples, as far
            as 20% of the training set allows (a few samples make the similarity noise; see
            `benchmarks/results/holdout_size.md`). A sample count is taken as given. NEq warns when the held-out split
            has fewer samples, and refuses a single sample.
        holdout_max_samples (`int`, defaults to `2048`):
            Cap of a fractional `holdout_size` (its outputs are kept in memory).
        holdout_batch_size (`int` or `None`, defaults to `None`):
            Batch size of the held-out pass; `None` uses `per_device_eval_batch_size`.
        holdout_group_by_length (`bool`, defaults to `True`):
            Order the held-out samples by length and cut them into batches of at most `holdout_batch_size` samples
            and at most `holdout_batch_size` x their mean length in padded tokens, so that a check pads little (as
            `TrainingArguments.group_by_length` does for training). The outputs do not depend on the batching; a
            check costs less: 0.49x the time of one padded batch for 64 SST-2 sentences of 3 to 42 tokens on MiniLM
            (CPU). No effect on samples without `input_ids`.
        holdout_in_train (`bool`, defaults to `True`):
            Keep the samples `NEqTrainer` carves for the held-out split in its training set. The training set and its
            batch order then stay those of the same `Trainer` run without NEq, and a NEq run is that run, bit for
            bit, until the first unit freezes; the probes are samples the model also trains on (the paper watches
            unseen samples). `False` removes them from training, which changes the data and the batch order: on the
            GLUE grid and its variations that cost as much accuracy as freezing did (README, "Does the default hold
            in every regime?"). Has no effect on a held-out dataset given explicitly.
        holdout_seed (`int`, defaults to `42`):
            Seed of the held-out carve (named apart from `TrainingArguments.seed` so both parse on one command line).

        > What is tracked

        unit_kinds (`list[str]`, defaults to `["heads", "neurons"]`):
            Unit kinds that may freeze: `"heads"` (attention heads) and/or `"neurons"` (MLP neurons).
        token_pooling (`str`, defaults to `"mean"`):
            How a unit's output vector is formed from token positions: `"mean"` pools the real (non-padding) tokens
            of each sample (bounded memory; a deliberate deviation from the paper), `"none"` keeps every real token's
            output, as the paper's "every output position".
        holdout_memory_budget_mb (`float` or `None`, defaults to `4096`):
            Hard limit, in MiB per process, on the reference outputs kept between checks (4 B x held-out samples, or
            their real tokens with `token_pooling="none"`, x the sum over layers of attention + MLP widths): NEq
            refuses to start above it, naming the formula and the remedy. `None` disables it (NEq still warns above
            10% of the device's available memory).
        freeze_embeddings (`bool`, defaults to `True`):
            Freeze the embeddings (and whatever else runs before the first layer) once every unit of the first layer
            is frozen, so that backward can stop there. Weights tied with the task head always train.
        row_sparse_min_frozen (`float`, defaults to `0.4`):
            A partly frozen weight computes its weight gradient for its active rows only when at least this fraction
            of its rows is frozen; below, the dense product is cheaper than the gathers it needs (measured), and the
            frozen rows of the dense gradient are zeroed.

        > Frozen-prefix cache

        cache_frozen_prefix (`bool` or `str`, defaults to `False`):
            Once the embeddings and the bottom layers are frozen, keep the hidden states entering the lowest
            trainable layer for every training sample and feed them instead of recomputing the frozen prefix (as
            AutoFreeze does): from the second time a sample is seen, the embeddings and the frozen layers do not run.
            Dropout inside the frozen prefix is off while it is on. See `neq_hf.prefix_cache.FrozenPrefixCache`.
            `"auto"`: on when the model trains on a CPU, off on a GPU, where the cache keeps its states in CPU RAM and
            bringing them back cost more than the prefix (an SST-2 run took 2.7x as long on an H200,
            `benchmarks/results/gpu_h200/`), under FSDP2, with gradient checkpointing and for models the cache does
            not support (their checks still skip the frozen prefix: `checks_skip_frozen_prefix`). Off by default
            because the missing dropout cost accuracy: on the CPU GLUE runs (MiniLM) it took the default from 0.90x
            to 0.83x the CPU time of full fine-tuning on SST-2 (MRPC 0.89x to 0.88x), and from 0.85x to 0.78x on a
            500-step run, where accuracy fell from 0.7 to 1.4 points below full fine-tuning (README, "GLUE"). In the
            last epoch a training batch with no cached sample runs without it.
        prefix_cache_megabytes (`int`, defaults to `1024`):
            Budget of the cache, in MiB of CPU RAM per process: 4 B (float32) x real tokens of the cached samples x
            hidden size. Samples beyond it are recomputed at every epoch (with a warning).
        checks_skip_frozen_prefix (`bool`, defaults to `True`):
            Held-out checks keep the hidden states entering the lowest trainable layer for the held-out samples
            (the same cache, restricted to the held-out split: held-out samples x real tokens x hidden size x 4 B)
            and do not rerun the frozen prefix, whose outputs cannot change. The decisions are those of a full
            forward. Off, or for models the cache does not support, every check runs the whole model.

        > Behaviour

        strict (`bool`, defaults to `False`):
            Raise instead of warning when NEq cannot act in a run (no room for a held-out split, too few checks);
            by default NEq then warns once and training proceeds exactly as with a plain `Trainer`.
    """

    criterion: str = field(
        default="relative",
        metadata={"help": "Equilibrium rule: 'relative' (scale-free) or 'absolute' (the paper's |v| < eps)."},
    )
    eps: float = field(default=1e-3, metadata={"help": "Threshold of the 'absolute' rule: |v| < eps (paper: 1e-3)."})
    eps_relative: float = field(
        default=0.1,
        metadata={"help": "Threshold of the 'relative' rule, as a fraction of the fastest layer's typical change."},
    )
    eps_relative_max: float = field(
        default=3e-3,
        metadata={"help": "Cap of the 'relative' rule's velocity threshold: also |v| < this (0: no cap)."},
    )
    mu: float = field(
        default=0.5, metadata={"help": "Velocity momentum mu in v_t = dphi_t - mu * v_{t-1} (0 <= mu < 1)."}
    )
    warmup: int = field(
        default=1, metadata={"help": "Checks after the reference check before any unit may freeze (>= 1)."}
    )
    pin_frozen: bool = field(
        default=False, metadata={"help": "Keep frozen units frozen for good instead of re-deciding at every check."}
    )
    layer_threshold: float = field(
        default=0.9,
        metadata={
            "help": "Freeze a whole layer when at least this fraction of its units is at equilibrium and every layer "
            "below is frozen (1.0: per-unit freezing only)."
        },
    )
    granularity: str = field(
        default="layer",
        metadata={
            "help": "What freezes: 'layer' (whole layers only, from the bottom up), 'unit' (units at equilibrium and "
            "whole layers) or 'auto' (layer on CUDA for models under 100M parameters, else unit).",
        },
    )
    min_loss_drop: float = field(
        default=0.1,
        metadata={
            "help": "No freezing before the training loss has dropped by this fraction from its start (0: no gate)."
        },
    )
    settle_fraction: float = field(
        default=0.0,
        metadata={
            "help": "No new freezing while the network moves more than this fraction of the most it moved so far "
            "(the relative rule's scale against its running maximum; 0: off)."
        },
    )
    checks_from_loss_drop: float = field(
        default=0.0,
        metadata={
            "help": "With the progress gate, start the held-out checks once the training loss has dropped by this "
            "fraction from its start (at most min_loss_drop; 0: from step 0)."
        },
    )
    check_every: str = field(
        default="auto",
        metadata={
            "help": "Held-out check schedule: 'auto' (20 checks per run, fewer if over check_budget), 'epoch' or a "
            "number of steps."
        },
    )
    check_budget: float = field(
        default=0.25,
        metadata={
            "help": "With check_every='auto', the most the checks may cost as a fraction of the training compute "
            "(estimated from sample counts; 0: no limit)."
        },
    )
    holdout_size: float = field(
        default=0.01,
        metadata={"help": "Held-out split carved from train: a fraction in (0, 1) or a whole sample count (>= 1)."},
    )
    holdout_min_samples: int = field(
        default=64, metadata={"help": "Floor of the carved held-out split, in samples (when train allows it)."}
    )
    holdout_max_samples: int = field(default=2048, metadata={"help": "Cap of the carved held-out split, in samples."})
    holdout_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Batch size of the held-out pass (default: per_device_eval_batch_size)."}
    )
    holdout_group_by_length: bool = field(
        default=True,
        metadata={"help": "Batch the held-out samples by length (less padding, same outputs)."},
    )
    holdout_in_train: bool = field(
        default=True,
        metadata={
            "help": "Keep the carved held-out samples in the training set (same data and batch order as without NEq)."
        },
    )
    holdout_seed: int = field(default=42, metadata={"help": "Seed of the held-out carve."})
    unit_kinds: list[str] = field(
        default_factory=lambda: list(UNIT_KINDS),
        metadata={"help": "Unit kinds that may freeze: 'heads' and/or 'neurons'."},
    )
    token_pooling: str = field(
        default="mean",
        metadata={"help": "Unit output vector: 'mean' over each sample's real tokens, or 'none' (every real token)."},
    )
    holdout_memory_budget_mb: Optional[float] = field(
        default=4096,
        metadata={"help": "Hard limit (MiB per process) on the held-out reference outputs; None disables it."},
    )
    freeze_embeddings: bool = field(
        default=True,
        metadata={
            "help": "Freeze the embeddings once every unit of the first layer is frozen (backward stops there)."
        },
    )

    row_sparse_min_frozen: float = field(
        default=0.4,
        metadata={
            "help": "Frozen fraction of a weight from which its weight gradient is computed for active rows only."
        },
    )

    cache_frozen_prefix: str = field(
        default=False,
        metadata={
            "help": "Cache the hidden states entering the lowest trainable layer per training sample once the "
            "embeddings and bottom layers are frozen, instead of recomputing the frozen prefix (dropout off there): "
            "true, false or 'auto' (on when training on a CPU; off by default: no dropout in the cached prefix)."
        },
    )
    prefix_cache_megabytes: int = field(
        default=1024, metadata={"help": "Budget of the frozen-prefix cache, in MiB of CPU RAM per process."}
    )
    checks_skip_frozen_prefix: bool = field(
        default=True,
        metadata={"help": "Held-out checks reuse the held-out samples' states above the frozen prefix (exact)."},
    )

    strict: bool = field(
        default=False,
        metadata={"help": "Raise instead of warning when NEq cannot act in a run (no held-out room, too few checks)."},
    )

    def __post_init__(self):
        object.__setattr__(self, "_validated", False)
        self._validate()
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value: Any) -> None:
        # Assigning a field after construction is validated like the constructor's arguments (a bad value would
        # otherwise fail late, inside training); the old value stays when the new one is refused.
        if not self.__dict__.get("_validated"):
            object.__setattr__(self, name, value)
            return
        old = dict(self.__dict__)
        object.__setattr__(self, name, value)
        object.__setattr__(self, "_validated", False)
        try:
            self._validate()
        except ValueError:
            self.__dict__.clear()
            self.__dict__.update(old)
            raise
        object.__setattr__(self, "_validated", True)

    def _validate(self) -> None:
        def bad(name: str, allowed: str):
            raise ValueError(f"NEqConfig.{name}={getattr(self, name)!r} is invalid: {allowed}.")

        for f in fields(self):
            if f.type in ("bool", bool):
                setattr(self, f.name, self._parse_bool(f.name, getattr(self, f.name)))
        seed = self.holdout_seed
        if isinstance(seed, str) and seed.strip().lstrip("-").isdigit():
            self.holdout_seed = int(seed)
        elif isinstance(seed, bool) or not isinstance(seed, int):
            bad("holdout_seed", "expected an integer seed")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps >= 0:
            bad("eps", "expected a number >= 0 (paper: 1e-3)")
        if self.criterion not in CRITERIA:
            bad("criterion", f"expected one of {list(CRITERIA)}")
        er = self.eps_relative
        if isinstance(er, bool) or not isinstance(er, (int, float)) or not er >= 0:
            bad("eps_relative", "expected a number >= 0")
        erm = self.eps_relative_max
        if isinstance(erm, bool) or not isinstance(erm, (int, float)) or not erm >= 0:
            bad("eps_relative_max", "expected a number >= 0 (0: no cap)")
        lt = self.layer_threshold
        if isinstance(lt, bool) or not isinstance(lt, (int, float)) or not 0 < lt <= 1:
            bad("layer_threshold", "expected a fraction in (0, 1] (1.0: per-unit freezing only)")
        if self.granularity not in GRANULARITIES:
            bad("granularity", f"expected one of {list(GRANULARITIES)}")
        mld = self.min_loss_drop
        if isinstance(mld, bool) or not isinstance(mld, (int, float)) or not 0 <= mld < 1:
            bad("min_loss_drop", "expected a fraction with 0 <= min_loss_drop < 1 (0: no gate)")
        sf = self.settle_fraction
        if isinstance(sf, bool) or not isinstance(sf, (int, float)) or not 0 <= sf <= 1:
            bad("settle_fraction", "expected a fraction with 0 <= settle_fraction <= 1 (0: no movement gate)")
        cfl = self.checks_from_loss_drop
        if isinstance(cfl, bool) or not isinstance(cfl, (int, float)) or not 0 <= cfl < 1:
            bad("checks_from_loss_drop", "expected a fraction with 0 <= checks_from_loss_drop < 1 (0: from step 0)")
        if self.token_pooling not in TOKEN_POOLING:
            bad("token_pooling", f"expected one of {list(TOKEN_POOLING)}")
        budget = self.holdout_memory_budget_mb
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0):
            bad("holdout_memory_budget_mb", "expected None or a number of MiB > 0")
        for name in ("holdout_min_samples", "holdout_max_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                bad(name, "expected an integer >= 2 (one sample makes the similarity degenerate)")
        if self.holdout_min_samples > self.holdout_max_samples:
            bad("holdout_min_samples", f"expected at most holdout_max_samples={self.holdout_max_samples}")
        if isinstance(self.mu, bool) or not isinstance(self.mu, (int, float)) or not 0 <= self.mu < 1:
            bad("mu", "expected a number with 0 <= mu < 1 (paper: 0.5)")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 1:
            bad("warmup", "expected an integer >= 1 (the velocity needs two checks after the reference)")
        self.check_every = self._parse_check_every(self.check_every)
        cache = self.cache_frozen_prefix
        if isinstance(cache, str) and cache.strip().lower() == "auto":
            self.cache_frozen_prefix = "auto"
        else:
            try:
                self.cache_frozen_prefix = self._parse_bool("cache_frozen_prefix", cache)
            except ValueError:
                bad("cache_frozen_prefix", "expected True, False or 'auto' (on when the model trains on a CPU)")
        cb = self.check_budget
        if isinstance(cb, bool) or not isinstance(cb, (int, float)) or not 0 <= cb <= 1:
            bad("check_budget", "expected a fraction with 0 <= check_budget <= 1 (0: no limit)")
        size = self.holdout_size
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not size > 0:
            bad("holdout_size", "expected a fraction in (0, 1) or a sample count >= 1")
        if isinstance(size, float) and size == 1:
            bad(
                "holdout_size",
                "1.0 is ambiguous (a fraction of 1.0 would be the whole training set): pass an integer count of "
                "samples (e.g. 1 or 64) or a fraction < 1 (e.g. 0.01)",
            )
        if isinstance(size, float) and size > 1:
            if not size.is_integer():
                bad("holdout_size", "expected a fraction in (0, 1) or a whole sample count >= 1")
            self.holdout_size = int(size)
        if self.holdout_batch_size is not None and (
            not isinstance(self.holdout_batch_size, int) or self.holdout_batch_size < 1
        ):
            bad("holdout_batch_size", "expected None or an integer >= 1")
        if isinstance(self.unit_kinds, str):
            self.unit_kinds = [k.strip() for k in self.unit_kinds.split(",") if k.strip()]
        self.unit_kinds = list(self.unit_kinds)
        m = self.row_sparse_min_frozen
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= 1:
            bad("row_sparse_min_frozen", "expected a fraction in [0, 1]")
        if not self.unit_kinds or any(k not in UNIT_KINDS for k in self.unit_kinds):
            bad("unit_kinds", f"expected a non-empty subset of {list(UNIT_KINDS)}")
        if len(set(self.unit_kinds)) != len(self.unit_kinds):
            bad("unit_kinds", "each kind may appear once (a repeated kind would count its units twice)")
        mb = self.prefix_cache_megabytes
        if isinstance(mb, bool) or not isinstance(mb, int) or mb < 1:
            bad("prefix_cache_megabytes", "expected an integer number of MiB >= 1")
        if self.cache_frozen_prefix is True and not self.freeze_embeddings:
            bad(
                "cache_frozen_prefix",
                "it needs freeze_embeddings=True (with trainable embeddings nothing below the layers stays fixed); "
                "set freeze_embeddings=True or cache_frozen_prefix=False",
            )

    @staticmethod
    def _parse_check_every(value: Union[str, int]) -> Union[str, int]:
        if isinstance(value, bool):
            raise ValueError(
                f"NEqConfig.check_every={value!r} is invalid: a boolean is not a schedule; expected 'auto', 'epoch' "
                "or a number of optimizer steps >= 1."
            )
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("epoch", "auto"):
                return text
            if text.isdigit():
                value = int(text)
        if isinstance(value, int) and value >= 1:
            return value
        raise ValueError(
            f"NEqConfig.check_every={value!r} is invalid: expected 'auto', 'epoch' or a number of optimizer steps >= 1."
        )

    @staticmethod
    def _parse_bool(name: str, value: Any) -> bool:
        # Strings come from JSON files, dicts or environment variables; bool("false") would be True.
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            text = value.strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
        raise ValueError(
            f"NEqConfig.{name}={value!r} is invalid: expected a boolean (True/False, or one of the strings "
            f"{', '.join(repr(t) for t in _TRUE + _FALSE)})."
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NEqConfig:
        known = {f.name for f in fields(cls)}
        data = dict(data)
        if "seed" in data and "holdout_seed" not in data:  # the field's former name
            data["holdout_seed"] = data.pop("seed")
        return cls(**{k: v for k, v in data.items() if k in known})
