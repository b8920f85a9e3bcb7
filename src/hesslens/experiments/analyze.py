"""``hesslens analyze``: the layer study of one zoo model on one data set, or of your own
Hugging Face model on your own data.

Examples (shell)::

    hesslens analyze --model lenet --data digits --out runs/lenet-digits
    hesslens analyze --model mlp --data mnist1d --seed 1 --k 10
    hesslens analyze --checkpoint runs/sgd/checkpoint.pt          # model and data from it
    hesslens analyze --model lenet --data mnist --data-root ~/data --dtype float64
    hesslens analyze --hf runs/my-gpt --text corpus.txt --seq-len 64 --sequences 8
    hesslens analyze --hf runs/my-classifier --tokens ids.npy --labels labels.npy

A zoo model (initialised from ``--seed``, or loaded from ``--checkpoint``) is analysed on the
seeded analysis subset of the training set (``--per-class`` examples of each class; the paper:
10), with the mean cross-entropy loss (a Hugging Face model of the zoo: its own loss).

``--hf DIR`` loads the folder ``save_pretrained`` wrote (never a download; its tokenizer when
it has one) and analyses the model's own loss on a ``--text`` (tokenised with that tokenizer,
cut into ``--seq-len`` token sequences, the first ``--sequences``), on token ids
(``--tokens``, a ``.pt``/``.npy`` integer array ``(N, T)``) or on images (``--images``). A
causal language model predicts its own tokens; a classifier needs ``--labels``; the blocks are
the transformer preset's (q, k, v, o, MLP of every layer) unless ``--layers`` says otherwise.
See :mod:`hesslens.experiments.analyze_hf`. Files written into ``--out``, the same for both:

``results.json``
    Everything, strict JSON. Top level::

        schema      "hesslens.layer_study/1"
        seed        the --seed
        run         model, data, data_root, checkpoint, per_class, num_classes,
                    num_samples, split_seed, subset_seed, model_seed, dtype, device, command
                    (--hf: model and checkpoint are the folder, data the file; hf
                    {path, architecture, model_class, model_type, task, tokenizer}; source
                    {kind, path, seq_len, labels, num_samples, mask_seed})
        settings    estimator settings (k, density_probes, density_steps, trace_rtol,
                    trace_max_hvp, eig_tol, gn_tol, gauss_newton, similarity_normalize, ...)
        data        the data set's fingerprint: name, sizes {array: shape}, sha256 of the
                    arrays used (x_train, y_train, x_test, y_test after normalisation), and
                    analysis_subset {name, sizes, sha256} of the examples analysed (--hf:
                    name, sizes and sha256 of the inputs x and labels y analysed, and source)
        versions    hesslens, python, torch, numpy, scipy, matplotlib, platform, device,
                    device_name
        num_samples, point {loss, grad_norm}, layer_names [forward order]
        full        entry (below) of the full Hessian; its "similarity" is the ranking
        layers      {layer name: entry} in forward order
        similarity  the ranking: metric, normalize, ranking [{name, rank, depth, distance}],
                    most_similar [names], most_similar_depths, middle_mean, outer_mean,
                    middle_more_similar, depth_spearman
        checks      interlacing_holds, max_interlacing_violation, layer_trace_sum,
                    full_trace, trace_sum_error, densities_normalized
        timings     seconds per step; n_hvp: operator products in all

    An entry (full network or layer block)::

        name, n_params (= dim)
        top_eigenvalues   [k floats, descending]
        eigensolver       residuals, bounds, converged, n_hvp, n_steps, which, tol
        trace             {value, stderr, n_hvp, method, n_samples}
        density           {nodes, weights}: the SLQ spectral measure (weights sum to 1)
        similarity        layer: {normalize, wasserstein, wasserstein_raw, js_divergence,
                          authors_distance, scale {layer, full}}; full: the ranking
        gauss_newton      {gn: {dim, top_eigenvalues, eigensolver, trace, density},
                           residual: {same; top eigenvalues by magnitude},
                           gn_top_ratio, residual_ratio, similarity_to_hessian}
                          (null with --no-gauss-newton)
        layer only: index, depth (index / (n - 1)), parameters [names],
                    ratios {top_eigenvalue, trace} (layer / full), interlacing {holds,
                    max_violation, violations, tolerances}

``layers.csv``
    One row for the full network, then one per layer (columns:
    :data:`hesslens.report.layer_report.CSV_COLUMNS`).
``densities.png``, ``similarity_depth.png``, ``layer_curvature.png``, ``gauss_newton.png``
    The figures; ``report.html`` embeds them (base64) with the tables: one file, offline.

Bad input (unknown model or data set, missing data folder, a checkpoint that does not fit; a
``--hf`` path that is not a saved model's folder, a text without a tokenizer, token ids of the
wrong shape or dtype or outside the vocabulary, a classifier without labels) raises
:class:`~hesslens.errors.HesslensInputError` before any work: one line on stderr and exit code
2, and no output folder.
"""

from __future__ import annotations

import argparse
import inspect
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hesslens import zoo
from hesslens.analysis import layer_study
from hesslens.errors import CheckpointError, HesslensInputError
from hesslens.experiments.analyze_hf import (
    HFReady,
    add_hf_arguments,
    preflight_hf,
    refuse_hf_options,
)
from hesslens.experiments.common import (
    add_common_arguments,
    apply_threads,
    check_out_dir,
    load_state_dict,
    out_dir_lock,
    positive_float,
    positive_int,
    prepare_out_dir,
    resolve_device,
    resolve_dtype,
    show_progress,
    versions,
)
from hesslens.experiments.preflight import check_ready, model_needs, require
from hesslens.linalg.trace import block_traces
from hesslens.parallel import process_group_from_env, quiet_other_ranks, shard
from hesslens.provenance import data_fingerprint, dataset_fingerprint
from hesslens.report.layer_report import layer_rows, write_layer_study
from hesslens.training.checkpoint import fit_problem

__all__ = ["DEFAULT_DATA", "DEFAULT_MODEL", "DEFAULT_PER_CLASS", "Prepared",
           "add_analyze_arguments", "preflight_analyze", "run_analyze"]

DEFAULT_MODEL = "cnn1d"
DEFAULT_DATA = "mnist1d"
DEFAULT_OUT = "hesslens-out/analyze"
DEFAULT_PER_CLASS = 10


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``hesslens analyze`` options to ``parser``."""
    parser.epilog = ("Writes results.json, layers.csv, PNG figures and a self-contained "
                     "report.html into --out. Under python -m torch.distributed.run "
                     "--nproc-per-node N -m hesslens analyze ... each process takes its piece "
                     "of the analysis subset (the same study as one process); rank 0 writes.")
    g = parser.add_argument_group("what to analyse")
    g.add_argument("--model", default=None,
                   help="zoo model: mlp, mlp5, cnn1d, lenet, vgg11, vgg11_bn, resnet18, resnet20, "
                        "gpt-nano, vit-tiny "
                        f"(default: the checkpoint's, else {DEFAULT_MODEL})")
    g.add_argument("--data", default=None,
                   help="zoo data set: mnist1d, digits, modadd, seqcopy (built in), mnist, "
                        "fashionmnist, svhn, cifar10, cifar100 (local files, see --data-root) "
                        f"(default: the checkpoint's, else {DEFAULT_DATA})")
    g.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder holding the local files of the file-based data sets")
    g.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="weights to analyse: a state_dict or a file written by hesslens train "
                        "(default: the model at its seeded initialisation)")
    g.add_argument("--layers", choices=["auto", "modules", "transformer", "transformer_heads"],
                   default="auto",
                   help="blocks of the study: one per module, or per transformer layer q, k, v "
                        "(slices of a fused QKV weight), o, mlp_in, mlp_out (+ per head); "
                        "auto (default): transformer for gpt-nano, vit-tiny and --hf, else "
                        "modules")
    g.add_argument("--per-class", type=positive_int, default=None, metavar="N",
                   help="analysis subset: N training examples of each class (default "
                        f"{DEFAULT_PER_CLASS}, as the paper)")

    g = parser.add_argument_group("estimators")
    g.add_argument("--k", type=positive_int, default=5,
                   help="top eigenvalues per layer and for the full network (default 5)")
    g.add_argument("--density-probes", type=positive_int, default=2, metavar="P",
                   help="SLQ probes per density (default 2)")
    g.add_argument("--density-steps", type=positive_int, default=80, metavar="M",
                   help="Lanczos steps per SLQ probe (default 80)")
    g.add_argument("--trace-rtol", type=positive_float, default=0.02, metavar="R",
                   help="relative standard error the trace estimates aim at (default 0.02)")
    g.add_argument("--trace-max-hvp", type=positive_int, default=600, metavar="N",
                   help="most products for the traces (default 600)")
    g.add_argument("--eig-tol", type=positive_float, default=1e-8, metavar="TOL",
                   help="relative tolerance of the Hessian eigenvalues (default 1e-8)")
    g.add_argument("--no-gauss-newton", action="store_true",
                   help="skip the Gauss-Newton split (faster)")
    g.add_argument("--similarity-normalize", choices=["top", "range", "none"], default="top",
                   help="scale the spectra are compared on: each divided by its largest "
                        "|eigenvalue| (top, default: compares shapes), by its range, or raw")
    add_hf_arguments(parser)
    add_common_arguments(parser, default_out=DEFAULT_OUT)


def _least_trace_hvp() -> int:
    """The fewest products the layer study's trace estimator accepts as its budget
    (``2 * sketch_rank + min_probes`` at :func:`hesslens.linalg.trace.block_traces`'s
    defaults, which the study uses)."""
    params = inspect.signature(block_traces).parameters
    return 2 * int(params["sketch_rank"].default) + int(params["min_probes"].default)


def _names(args: argparse.Namespace, config: dict[str, Any]) -> tuple[str, str]:
    model = args.model or config.get("model") or DEFAULT_MODEL
    data = args.data or config.get("data") or DEFAULT_DATA
    return str(model), str(data)


def _fit_checkpoint(model: Any, state: dict, path: str, model_name: str, data: str,
                    rest: dict | None = None) -> None:
    problem = fit_problem({**(rest or {}), "model": state}, model)  # names, shapes, values
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {path} does not fit model {model_name!r} on {data!r}: {problem}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        detail = detail.replace("Error(s) in loading state_dict for ", "")
        if len(detail) > 300:
            detail = detail[:297] + "..."
        raise HesslensInputError(
            f"checkpoint {path} does not fit model {model_name!r} on {data!r}: {detail}"
        ) from None


def _print_table(results: dict[str, Any], out: Any, seconds: float) -> None:
    rows = layer_rows(results)
    width = max(14, min(24, max(len(r["name"]) for r in rows)))
    head = (f"{'layer':<{width}} {'depth':>5} {'params':>8} {'lambda1':>10} {'/full':>6} "
            f"{'trace':>10} {'± se':>8} {'/full':>6} {'W1':>7} {'rank':>4} {'G lambda1':>10}")
    print(head)
    print("-" * len(head))

    def f(x: Any, spec: str) -> str:
        if x is None:
            width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 1)
            return "-".rjust(width)
        return format(x, spec)

    for r in rows:
        # the end of a long name says the most ("...h.1.attn.q")
        name = r["name"] if len(r["name"]) <= width else "~" + r["name"][-(width - 1):]
        print(f"{name:<{width}} {f(r['depth'], '5.2f')} {f(r['n_params'], '8d')} "
              f"{f(r['top_eigenvalue'], '10.4g')} {f(r['top_ratio'], '6.3f')} "
              f"{f(r['trace'], '10.4g')} {f(r['trace_stderr'], '8.2g')} "
              f"{f(r['trace_ratio'], '6.3f')} "
              f"{f(r['wasserstein'], '7.4f')} {f(r['similarity_rank'], '4d')} "
              f"{f(r['gn_top_eigenvalue'], '10.4g')}")
    sim = results.get("similarity") or {}
    checks = results.get("checks") or {}
    print(f"most similar to the full spectrum: {', '.join(sim.get('most_similar', [])) or '-'}"
          f"  (W1, {sim.get('normalize', 'top')}-normalised)")
    print(f"interlacing holds: {'yes' if checks.get('interlacing_holds') else 'NO'}; "
          f"layer traces sum to {checks.get('layer_trace_sum', float('nan')):.6g} "
          f"(full {checks.get('full_trace', float('nan')):.6g})")
    print(f"wrote {out}/results.json, layers.csv, figures and report.html in {seconds:.1f} s")


@dataclass
class Prepared:
    """What :func:`preflight_analyze` checked and built: the names, the data set's facts,
    the model (weights loaded), the checkpoint's other entries and the run's settings."""

    model_name: str
    data_name: str
    info: Any
    model: Any
    state: dict | None
    rest: dict
    config: dict
    data_root: str | None
    split_seed: int
    per_class: int
    n_params: int
    dtype: Any


def preflight_analyze(args: argparse.Namespace) -> Prepared | HFReady:
    """Everything ``hesslens analyze`` can know before it loads data: the flags, the modules
    it imports (matplotlib for the figures; transformers for a Hugging Face model), the
    device, the output folder (writable, not a file), the checkpoint, and the model/data pair
    (the model is built and the checkpoint loaded into it; ``--k`` within its dimension; the
    data folder of a file-based data set given). With ``--hf``:
    :func:`~hesslens.experiments.analyze_hf.preflight_hf` (the folder, the data files, the
    model's forward on them)."""
    least = _least_trace_hvp()
    if args.trace_max_hvp < least:
        raise HesslensInputError(
            f"--trace-max-hvp {args.trace_max_hvp} is below the {least} products the trace "
            f"estimator needs at least (its sketch and first probes): give --trace-max-hvp "
            f"{least} or more")
    if args.hf is not None:
        return preflight_hf(args)
    refuse_hf_options(args)
    check_ready(out=args.out, device=args.device,
                needs={"matplotlib": "the figures of the report"})
    dtype = resolve_dtype(args.dtype)
    state, rest = (None, {})
    if args.checkpoint:
        state, rest = load_state_dict(args.checkpoint)
    config = rest.get("config") if isinstance(rest.get("config"), dict) else {}
    model_name, data_name = _names(args, config)
    info = zoo.dataset_info(data_name)  # unknown data set: clear error before any work
    if model_name not in zoo.MODELS:
        raise HesslensInputError(
            f"unknown model {model_name!r}; choose one of: {', '.join(sorted(zoo.MODELS))}")
    require(model_needs(model_name))
    try:  # the model's fit to the data's input shape is known before loading anything
        model = zoo.build_model(model_name, info.input_shape, info.num_classes, seed=args.seed)
    except HesslensInputError as err:
        raise HesslensInputError(
            f"model {model_name!r} does not fit data set {data_name!r} (inputs of shape "
            f"{info.input_shape}): {err}") from None
    if state is not None:
        _fit_checkpoint(model, state, args.checkpoint, model_name, data_name, rest)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.k > n_params:  # as the operators refuse it, before any data is loaded
        raise HesslensInputError(
            f"--k {args.k} is larger than the dimension of {model_name}'s Hessian on "
            f"{data_name} ({n_params} parameters): ask for at most --k {n_params}")
    data_root = args.data_root if args.data_root is not None else (
        config.get("data_root") if config.get("data") == data_name else None)
    if not info.builtin and data_root is None:
        raise HesslensInputError(
            f"{data_name} is read from files on disk: pass --data-root DIR, the folder holding "
            f"{', '.join(info.files)} (hesslens never downloads data; mnist1d and digits are "
            "built in)")
    # the train/test split of "digits" depends on the seed the model was trained with
    split_seed = int(config["seed"]) if config.get("data") == data_name and isinstance(
        config.get("seed"), int) else args.seed
    per_class = DEFAULT_PER_CLASS if args.per_class is None else args.per_class
    return Prepared(model_name, data_name, info, model, state, rest, config, data_root,
                    split_seed, per_class, n_params, dtype)


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``hesslens analyze``; print a short table; return the exit code (0).

    Under ``torchrun`` (``WORLD_SIZE > 1``) every process takes its piece of the analysis
    subset (of a Hugging Face model's sequences) and the operators sum their products over
    the processes, so the study is the single-process one; rank 0 alone writes the files and
    prints."""
    t0 = time.perf_counter()
    ready = preflight_analyze(args)
    with process_group_from_env(args.device) as ranks:
        quiet_other_ranks(ranks)
        with out_dir_lock(args.out, "analyze", ranks):
            device = resolve_device(args.device, ranks)
            threads = apply_threads(args.threads,
                                    ready.n_params if device.type == "cpu" else None)
            subject = (_hf_subject(ready) if isinstance(ready, HFReady)
                       else _zoo_subject(args, ready))
            return _run_study(args, ranks, subject, device, threads, t0)


@dataclass
class _Subject:
    """What the study runs on, from the zoo or from a Hugging Face folder: the model, its loss
    (``None``: its own), the examples and labels (CPU), how a rank's share of them becomes
    batches, the blocks' preset, what results.json records of the run (``run``: the source's
    entries) and of the data, and ``--dtype``."""

    model: Any
    loss_fn: Any
    x: Any
    y: Any
    batches: Callable[[Any, Any], list]
    layers: str
    run: dict[str, Any]
    data: dict[str, Any]
    dtype: Any


def _zoo_subject(args: argparse.Namespace, ready: Prepared) -> _Subject:
    """The zoo model on the seeded analysis subset of its data set's training set."""
    model_name, data_name, state, rest = ready.model_name, ready.data_name, ready.state, ready.rest
    dataset = zoo.load_dataset(data_name, root=ready.data_root, seed=ready.split_seed)
    token_task = dataset.train[1].dim() == 2
    subset = zoo.token_subset if token_task else zoo.analysis_subset
    x, y = subset(*dataset.train, per_class=ready.per_class, seed=args.seed)
    # what the model takes: (x, y) pairs and cross-entropy, or mappings and the model's own
    # loss for the Hugging Face models of the zoo
    loss_fn = zoo.model_loss(model_name)
    hf_model = zoo.model_input(model_name) is not None
    layers = args.layers if args.layers != "auto" else (
        "transformer" if hf_model else "modules")
    run = {
        "model": model_name,
        "data": data_name,
        "data_root": None if ready.data_root is None else str(ready.data_root),
        "checkpoint": args.checkpoint,
        "checkpoint_epoch": rest.get("epoch") if isinstance(rest.get("epoch"), int) else None,
        "per_class": ready.per_class,
        "num_classes": ready.info.num_classes,
        "num_samples": int(y.shape[0]),
        "split_seed": ready.split_seed,
        "subset_seed": args.seed,
        "model_seed": None if state is not None else args.seed,
        "loss": "the model's own loss (mean over label tokens)" if loss_fn is None
        else "cross-entropy (mean)",
    }
    data = {**dataset_fingerprint(dataset, data_name),
            "analysis_subset": data_fingerprint(f"{data_name} analysis subset",
                                                {"x": x, "y": y})}
    return _Subject(ready.model, loss_fn, x, y,
                    lambda xs, ys: zoo.model_batches(model_name, xs, ys), layers, run, data,
                    ready.dtype)


def _hf_subject(ready: HFReady) -> _Subject:
    """A Hugging Face folder's model on the sequences (images) of the user's file."""
    hf, source = ready.hf, ready.source
    per_token = ready.y.dim() == 2 and not ready.y.is_floating_point()
    run = {
        "model": str(hf.path),
        "data": source["path"],
        "checkpoint": str(hf.path),
        "hf": hf.record(),
        "source": source,
        "num_samples": int(ready.x.shape[0]),
        "loss": "the model's own loss (mean over " + (
            "label tokens)" if per_token else "examples)"),
    }
    data = {**data_fingerprint(Path(source["path"]).name, {"x": ready.x, "y": ready.y}),
            "source": source}
    return _Subject(hf.model, None, ready.x, ready.y, ready.batches, ready.layers, run, data,
                    ready.dtype)


def _run_study(args: argparse.Namespace, ranks: Any, subject: _Subject, device: Any,
               threads: int, t0: float) -> int:
    """The layer study of ``subject`` (each rank its share of the examples), its results and,
    on rank 0, the files and the table."""
    out = prepare_out_dir(args.out) if ranks.is_main else check_out_dir(args.out)
    x, y = subject.x.to(device), subject.y.to(device)
    if len(y) < ranks.world:
        raise HesslensInputError(
            f"the analysis has {len(y)} examples, fewer than the {ranks.world} processes; "
            "give more examples (--per-class, --sequences) or use fewer processes")
    # under torchrun each rank its piece of the examples; the operators sum over the ranks
    batches = subject.batches(shard(x, ranks), shard(y, ranks))

    progress = show_progress(args) and ranks.is_main
    study = layer_study(
        subject.model, subject.loss_fn, batches, layers=subject.layers,
        k=args.k, density_probes=args.density_probes, density_steps=args.density_steps,
        trace_rtol=args.trace_rtol, trace_max_hvp=args.trace_max_hvp, eig_tol=args.eig_tol,
        gauss_newton=not args.no_gauss_newton, similarity_normalize=args.similarity_normalize,
        seed=args.seed, dtype=subject.dtype, device=device, progress=progress)

    results = study.to_dict()
    results["run"] = {
        "command": "hesslens analyze " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "analyze" else None,
        **subject.run,
        "layers": subject.layers,
        "threads": threads,
        "device": str(device),
        "dtype": results["settings"]["dtype"],
        "parallel": ranks.record(),
    }
    results["data"] = subject.data
    results["versions"] = versions(device)
    results["timings"]["study_total"] = time.perf_counter() - t0
    if ranks.is_main:
        write_layer_study(results, out)
        _print_table(results, out, time.perf_counter() - t0)
    return 0
