"""Peak memory of one curvature product through a large vocabulary: GPT-2-small
(``GPT2Config()``, 124M parameters, built from its config, never downloaded) on its own loss at
8 sequences x 512 tokens, the output layer and cross-entropy whole (``token_chunk_bytes=None``,
"before") and in token chunks (the default, "after"): Hessian products by double backward
(``path="reverse"``) and by differences of gradients (``path="fd"``), Gauss-Newton products,
and the chunked Hessian with Hugging Face activation checkpointing.

Each case runs in a fresh process: it builds the model and the batch, records its resident set,
then runs one thing (one gradient of the model's loss; or building the operator and one product
with a random vector) and reports the rise of its peak resident set (``VmHWM``) in MiB and in
float32 copies of the parameters, and the seconds. The parent polls each case's resident set and
stops it above ``--max-gib`` (the machine may be shared): such a case is reported as stopped,
with the resident set it had reached.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_lm_head.py            # all cases, 8 x 512
    python benchmarks/bench_lm_head.py --layers 2 --tokens 64 --out /tmp/lm.json  # a smoke run
    python benchmarks/bench_lm_head.py --cases gradient hessian-chunked

prints a table and writes ``benchmarks/results/lm_head.json`` (a run of some cases replaces
those cases' rows there and keeps the others of the same setting).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from _measure import CHILD_ENV, load_fixed_costs, vm, write_results

CASES = ("gradient", "hessian-unchunked", "hessian-chunked", "hessian-chunked-checkpointing",
         "gauss-newton-unchunked", "gauss-newton-chunked", "hessian-fd-unchunked",
         "hessian-fd-chunked", "hessian-fd-chunked-checkpointing")


def _child(case: str, batch_size: int, tokens: int, layers: int | None) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import hesslens as hl

    torch.manual_seed(0)
    config = GPT2Config() if layers is None else GPT2Config(n_layer=layers)
    model = GPT2LMHeadModel(config).eval()
    n = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (batch_size, tokens),
                        generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    v = torch.randn(n, generator=torch.Generator().manual_seed(1))
    if case.endswith("checkpointing"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated alias in transformers 5
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    chunking = {} if "-chunked" in case else {"token_chunk_bytes": None}
    load_fixed_costs()
    base = vm("VmRSS")
    t0 = time.perf_counter()
    extra: dict = {}
    if case == "gradient":
        model(**batch).loss.backward()
    elif case.startswith("hessian"):
        # fd: central differences of two gradients (the peak of the fourth-order products,
        # which take their gradients one at a time, at half the time)
        path = {"path": "fd", "fd_order": 2} if "-fd" in case else {"path": "reverse"}
        H = hl.Hessian(model, None, [batch], **path, **chunking)
        norm = float(H.hvp(v).norm())
        extra = {"product_norm": norm,
                 "chunked": H._shared.loop.loss.lm_head is not None}
    else:
        G = hl.GaussNewton(model, None, [batch], **chunking)
        extra = {"product_norm": float(G.hvp(v).norm()),
                 "chunked": G._shared.loop.loss.lm_head is not None}
    seconds = time.perf_counter() - t0
    return {"case": case, "n_params": n, "bytes": vm("VmHWM") - base, "seconds": seconds,
            "threads": torch.get_num_threads(), **extra}


def _run(cmd: list[str], max_bytes: int) -> tuple[int, str, str, int]:
    """Run ``cmd``, stopping it when its resident set passes ``max_bytes``: (return code,
    stdout, stderr, the most resident bytes seen)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=CHILD_ENV)
    status = Path(f"/proc/{proc.pid}/status")
    seen = 0
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    seen = max(seen, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        if seen > max_bytes:
            proc.kill()
            break
        time.sleep(0.2)
    out, err = proc.communicate()
    return proc.returncode, out, err, seen


def _merged(path: str, setting: dict, rows: list[dict]) -> list[dict]:
    """``rows`` after the rows of the other cases already in ``path`` for the same setting (a
    run of some cases updates those)."""
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return rows
    if any(old.get(k) != v for k, v in setting.items()):
        return rows
    done = {r["case"] for r in rows}
    return [r for r in old.get("rows", []) if r.get("case") not in done] + rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--layers", type=int, default=None,
                        help="transformer layers (default: GPT-2-small's 12)")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--max-gib", type=float, default=14.0,
                        help="stop a case whose resident set passes this many GiB")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lm_head.json"))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.batch, args.tokens, args.layers)))
        return 0
    rows = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--child", case, "--batch", str(args.batch),
               "--tokens", str(args.tokens),
               *(["--layers", str(args.layers)] if args.layers else [])]
        load = os.getloadavg()
        code, out, err, seen = _run(cmd, int(args.max_gib * 2**30))
        if seen > args.max_gib * 2**30:
            rows.append({"case": case, "stopped": f"resident set passed {args.max_gib} GiB",
                         "resident_bytes": seen, "load_before": load})
        elif code != 0:
            rows.append({"case": case, "error": err.strip().splitlines()[-1:],
                         "load_before": load})
        else:
            rows.append({**json.loads(out.strip().splitlines()[-1]), "load_before": load,
                         "load_after": os.getloadavg()})
        rows[-1]["max_gib"] = args.max_gib
        print(f"  {case}: {json.dumps(rows[-1])}", flush=True)
    print(f"{'case':<32} {'peak rise MiB':>14} {'f32 param copies':>17} {'seconds':>8}")
    for r in rows:
        if "bytes" not in r:
            print(f"{r['case']:<32} {r.get('stopped') or r.get('error')}")
            continue
        r["float32_copies"] = r["bytes"] / (4 * r["n_params"])
        print(f"{r['case']:<32} {r['bytes'] / 2**20:14.0f} {r['float32_copies']:17.1f} "
              f"{r['seconds']:8.1f}")
    setting = {"benchmark": "lm_head", "batch": args.batch, "tokens": args.tokens,
               "layers": args.layers or 12}
    write_results(args.out, {**setting, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                             "rows": _merged(args.out, setting, rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
