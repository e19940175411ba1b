"""Cost of the SteerMoE router-logit edit next to the routing it precedes.

For each (tokens, experts) this times, in one run and on the same inputs:

* vllm_topk   vLLM's own softmax top-k routing: `fused_topk` (CUDA op `topk_softmax`) on CUDA,
              the CPU router's `_softmax_topk` on CPU;
* torch_topk  a plain torch softmax + top-k + renormalise;
* torch_edit  the steering edit as plain torch (`steering_math.steer_router_logits`);
* triton_edit the Triton kernel (`triton_steering.steer_router_logits_triton`); CUDA only,
              unless --triton-interpret (CPU interpreter: correct but far too slow to mean much);
* *_edit+vllm the edit followed by vLLM's top-k, as the engine runs them;
* fused_torch the steered top-k in one call, plain torch (`fused_routing.steered_topk_torch`);
* fused       the steered top-k as one Triton kernel (`fused_routing.steered_topk_triton`);
              CUDA only, unless --triton-interpret.

Graded steering: the engine always hands the edit its bias and strength tables, so on/off
profiles run the same code as graded ones. `*_onoff` times that path with on/off tables (no
bias, strength 1) and `*_graded` with graded ones (a bias on a quarter of the experts and
strength 0.5 for every profile); `graded/onoff` is their ratio (the cost of a graded profile
over an on/off one) and `onoff/plain` the cost of the graded-capable path over the edit without
bias and strength tables (`torch_edit`, `triton_edit`). The engine's CPU op skips the tables on
steps where no scheduled request is graded, so there on/off profiles cost `torch_edit`.

Half the rows are steered, spread over 4 profiles. Times are medians in microseconds per call
(CUDA events on CUDA, time.perf_counter on CPU, both after warmup; each sample averages enough
back-to-back calls to last ~0.2 ms on CUDA / ~1 ms on CPU).

    python -m benchmarks.routing_microbench --device cpu
    python -m benchmarks.routing_microbench --device cuda --json bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

CPU_TOKENS = "1,16,256,2048,16384"
CUDA_TOKENS = "1,16,256,2048,16384"
NUM_PROFILES = 4
# In the interpreter the Triton kernel costs milliseconds per row; only small T are timed.
INTERPRET_MAX_TOKENS = 256


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def make_inputs(
    num_tokens: int, num_experts: int, top_k: int, dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [T, E], profiles [T] (half the rows steered over 4 profiles), masks, eps."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_tokens, num_experts, generator=g) * 2.0).to(dtype)
    profiles = torch.randint(1, NUM_PROFILES + 1, (num_tokens,), generator=g, dtype=torch.int32)
    profiles[torch.randperm(num_tokens, generator=g)[: num_tokens // 2]] = 0
    if num_tokens == 1:
        profiles[0] = 1
    masks = torch.zeros(NUM_PROFILES + 1, num_experts, dtype=torch.int8)
    for p in range(1, NUM_PROFILES + 1):
        perm = torch.randperm(num_experts, generator=g)
        n_act = max(1, min(top_k, num_experts) // 2)
        n_deact = num_experts // 4
        masks[p, perm[:n_act]] = 1
        masks[p, perm[n_act : n_act + n_deact]] = -1
    eps = torch.full((NUM_PROFILES + 1,), 0.01)
    return logits.to(device), profiles.to(device), masks.to(device), eps.to(device)


def graded_tables(masks: torch.Tensor, graded: bool,
                  seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(bias [P, E], strength [P]) for `masks`: none and 1, or a bias on a quarter of each
    profile's untouched experts and strength 0.5."""
    bias = torch.zeros(masks.shape, dtype=torch.float32, device=masks.device)
    strength = torch.ones(masks.shape[0], dtype=torch.float32, device=masks.device)
    if graded:
        g = torch.Generator().manual_seed(seed)
        values = (torch.rand(masks.shape, generator=g) * 4 - 2).to(masks.device)
        chosen = (torch.rand(masks.shape, generator=g) < 0.25).to(masks.device) & (masks == 0)
        bias = torch.where(chosen, values, bias)
        bias[0] = 0
        strength[1:] = 0.5
    return bias, strength


def vllm_topk_fn(device: str) -> tuple[Callable[[torch.Tensor, int], Any] | None, str]:
    """vLLM's softmax top-k for `device` (renormalised), and a label; (None, reason) if absent."""
    try:
        if device == "cuda":
            from vllm.model_executor.layers.fused_moe.router.fused_topk_router import fused_topk

            # fused_topk(hidden_states, gating_output, topk, renormalize, indices_type=None,
            # scoring_func="softmax") in vLLM 0.26 .. 0.32; hidden_states is only used for
            # its row count, so the logits stand in for it.
            def run(logits: torch.Tensor, k: int) -> Any:
                return fused_topk(logits, logits, k, True)

            return run, "fused_topk"
        from vllm.model_executor.layers.fused_moe.router.cpu_router import _softmax_topk

        def run_cpu(logits: torch.Tensor, k: int) -> Any:
            return _softmax_topk(logits, k, True)

        return run_cpu, "cpu_router._softmax_topk"
    except Exception as exc:  # vLLM missing, or built without this op
        return None, f"unavailable ({type(exc).__name__}: {exc})"


def torch_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax over all experts, top-k, renormalise."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids.to(torch.int32)


Routing = tuple[torch.Tensor, torch.Tensor]


def same_routing(got: Routing, ref: Routing, logits: torch.Tensor) -> bool:
    """Same weights per row (sorted, within 1e-4) and same experts, except where the k-th and
    (k+1)-th best `logits` tie (either router may break that tie its own way)."""
    k = got[1].shape[1]
    weights_a = torch.sort(got[0].float(), dim=1, descending=True).values
    weights_b = torch.sort(ref[0].float(), dim=1, descending=True).values
    if not torch.allclose(weights_a, weights_b, atol=1e-4):
        return False
    ids_a = torch.sort(got[1].long(), dim=1).values
    ids_b = torch.sort(ref[1].long(), dim=1).values
    checked = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    if k < logits.shape[1]:
        top = torch.topk(logits.float(), k + 1, dim=1).values
        checked = top[:, k - 1] != top[:, k]
    return torch.equal(ids_a[checked], ids_b[checked])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_us(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 3) -> float:
    """Median microseconds per call of `fn` over `repeats` samples, after warmup."""
    for _ in range(warmup):
        fn()
    _sync(device)
    # One call sets how many back-to-back calls make one sample.
    start = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - start, 1e-7)
    target = 2e-4 if device == "cuda" else 1e-3
    inner = max(1, min(1000, math.ceil(target / once)))
    samples = []
    if device == "cuda":
        for _ in range(repeats):
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) * 1e3 / inner)
    else:
        for _ in range(repeats):
            begin_s = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - begin_s) * 1e6 / inner)
    return statistics.median(samples)


def bench_one(
    num_tokens: int,
    num_experts: int,
    args: argparse.Namespace,
    vllm_topk: Callable[[torch.Tensor, int], Any] | None,
    triton_edit: Callable[..., torch.Tensor] | None,
) -> dict[str, Any]:
    """Time every variant for one (T, E); returns a row of the results table."""
    from vllm_patches.fused_routing import steered_topk_torch, steered_topk_triton
    from vllm_patches.steering_math import steer_router_logits

    dtype = getattr(torch, args.dtype)
    k = min(args.top_k, num_experts)
    logits, profiles, masks, eps = make_inputs(num_tokens, num_experts, k, dtype, args.device)
    row: dict[str, Any] = {"tokens": num_tokens, "experts": num_experts, "top_k": k}

    def t(fn: Callable[[], Any], repeats: int = args.repeats) -> float:
        return time_us(fn, args.device, repeats)

    row["torch_topk_us"] = t(lambda: torch_topk(logits, k))
    row["torch_edit_us"] = t(lambda: steer_router_logits(logits, profiles, masks, eps))
    row["vllm_topk_us"] = row["torch_edit+vllm_us"] = None
    if vllm_topk is not None:
        row["vllm_topk_us"] = t(lambda: vllm_topk(logits, k))
        row["torch_edit+vllm_us"] = t(
            lambda: vllm_topk(steer_router_logits(logits, profiles, masks, eps), k)
        )
    row["triton_edit_us"] = row["triton_edit+vllm_us"] = row["triton_matches"] = None
    interpret = args.device == "cpu"
    if triton_edit is not None and not (interpret and num_tokens > INTERPRET_MAX_TOKENS):
        out = torch.empty_like(logits)
        expected = steer_router_logits(logits, profiles, masks, eps)
        row["triton_matches"] = torch.equal(triton_edit(logits, profiles, masks, eps), expected)
        reps = min(args.repeats, 3) if interpret else args.repeats
        row["triton_edit_us"] = t(lambda: triton_edit(logits, profiles, masks, eps, out=out), reps)
        if vllm_topk is not None:
            row["triton_edit+vllm_us"] = t(
                lambda: vllm_topk(triton_edit(logits, profiles, masks, eps, out=out), k), reps
            )

    row["fused_torch_us"] = t(
        lambda: steered_topk_torch(logits, profiles, masks, eps, k, True)
    )
    row["fused_us"] = row["fused_matches"] = None
    if triton_edit is not None and not (interpret and num_tokens > INTERPRET_MAX_TOKENS):
        edited = steer_router_logits(logits, profiles, masks, eps)
        reference = torch_topk(edited, k)
        fused = (torch.empty(num_tokens, k, device=args.device),
                 torch.empty(num_tokens, k, dtype=torch.int32, device=args.device))
        row["fused_matches"] = same_routing(
            steered_topk_triton(logits, profiles, masks, eps, k, True), reference, edited
        )
        reps = min(args.repeats, 3) if interpret else args.repeats
        row["fused_us"] = t(
            lambda: steered_topk_triton(logits, profiles, masks, eps, k, True, out=fused), reps
        )

    for label, graded in (("onoff", False), ("graded", True)):
        bias, strength = graded_tables(masks, graded)
        row[f"torch_{label}_us"] = t(lambda b=bias, s=strength: steer_router_logits(
            logits, profiles, masks, eps, b, s))
        row[f"triton_{label}_us"] = row[f"fused_{label}_us"] = None
        if triton_edit is not None and not (interpret and num_tokens > INTERPRET_MAX_TOKENS):
            out = torch.empty_like(logits)
            reps = min(args.repeats, 3) if interpret else args.repeats
            row[f"triton_{label}_us"] = t(lambda b=bias, s=strength, o=out: triton_edit(
                logits, profiles, masks, eps, out=o, layer_bias=b, strength=s), reps)
            row[f"fused_{label}_us"] = t(lambda b=bias, s=strength: steered_topk_triton(
                logits, profiles, masks, eps, k, True, layer_bias=b, strength=s), reps)

    def ratio(num: str, den: str) -> float | None:
        a, b = row.get(num), row.get(den)
        return None if a is None or b is None else a / b

    for impl in ("torch", "triton", "fused"):
        row[f"{impl}:graded/onoff"] = ratio(f"{impl}_graded_us", f"{impl}_onoff_us")
    row["torch:onoff/plain"] = ratio("torch_onoff_us", "torch_edit_us")
    row["triton:onoff/plain"] = ratio("triton_onoff_us", "triton_edit_us")

    base = "vllm_topk_us" if vllm_topk is not None else "torch_topk_us"
    row["ratio_base"] = base.removesuffix("_us")
    row["torch_edit/topk"] = ratio("torch_edit_us", base)
    row["triton_edit/topk"] = ratio("triton_edit_us", base)
    row["(torch_edit+topk)/topk"] = ratio("torch_edit+vllm_us", "vllm_topk_us")
    row["(triton_edit+topk)/topk"] = ratio("triton_edit+vllm_us", "vllm_topk_us")
    row["fused_torch/topk"] = ratio("fused_torch_us", base)
    row["fused/topk"] = ratio("fused_us", base)
    return row


COLUMNS = [
    ("tokens", "T", "{:d}"),
    ("experts", "E", "{:d}"),
    ("vllm_topk_us", "vllm_topk", "{:.1f}"),
    ("torch_topk_us", "torch_topk", "{:.1f}"),
    ("torch_edit_us", "torch_edit", "{:.1f}"),
    ("triton_edit_us", "triton_edit", "{:.1f}"),
    ("torch_edit+vllm_us", "t_edit+vllm", "{:.1f}"),
    ("triton_edit+vllm_us", "tr_edit+vllm", "{:.1f}"),
    ("torch_edit/topk", "t_edit/topk", "{:.2f}"),
    ("triton_edit/topk", "tr_edit/topk", "{:.2f}"),
    ("(torch_edit+topk)/topk", "(t_edit+topk)/topk", "{:.2f}"),
    ("(triton_edit+topk)/topk", "(tr_edit+topk)/topk", "{:.2f}"),
    ("fused_torch_us", "fused_torch", "{:.1f}"),
    ("fused_us", "fused", "{:.1f}"),
    ("fused_torch/topk", "fused_torch/topk", "{:.2f}"),
    ("fused/topk", "fused/topk", "{:.2f}"),
    ("torch_graded_us", "t_graded", "{:.1f}"),
    ("torch:graded/onoff", "t:graded/onoff", "{:.2f}"),
    ("torch:onoff/plain", "t:onoff/plain", "{:.2f}"),
    ("triton:graded/onoff", "tr:graded/onoff", "{:.2f}"),
    ("triton:onoff/plain", "tr:onoff/plain", "{:.2f}"),
    ("fused:graded/onoff", "fused:graded/onoff", "{:.2f}"),
]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width table; '-' where a variant was not run."""
    cells = [[head for _, head, _ in COLUMNS]]
    for row in rows:
        cells.append(
            ["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]
        )
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--tokens", default=None, help=f"CPU: {CPU_TOKENS}; CUDA: {CUDA_TOKENS}")
    parser.add_argument("--experts", default="8,64,128,256")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=None, help="samples (CPU 15, CUDA 50)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (CPU default 1: on shared cores, OpenMP regions stall for ms)",
    )
    parser.add_argument(
        "--triton-interpret",
        action="store_true",
        help=f"CPU: also time the Triton kernel interpreted (T <= {INTERPRET_MAX_TOKENS})",
    )
    parser.add_argument("--json", default=None, help="write results and environment here")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.tokens is None:
        args.tokens = CPU_TOKENS if args.device == "cpu" else CUDA_TOKENS
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.repeats is None:
        args.repeats = 15 if args.device == "cpu" else 50
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu" and args.triton_interpret:
        # Before the kernel is first built (triton picks interpreter vs compiler then).
        os.environ["TRITON_INTERPRET"] = "1"

    triton_edit = None
    triton_note = "skipped on CPU (pass --triton-interpret to run it in the interpreter)"
    if args.device == "cuda" or args.triton_interpret:
        from vllm_patches.triton_steering import steer_router_logits_triton, triton_available

        if triton_available():
            triton_edit = steer_router_logits_triton
            triton_note = "interpreter" if args.device == "cpu" else "compiled"
        else:
            triton_note = "unavailable (triton missing or not runnable here)"
    vllm_topk, vllm_label = vllm_topk_fn(args.device)

    device_name = (
        torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    )
    print(
        f"device={args.device} ({device_name}) dtype={args.dtype} top_k={args.top_k} "
        f"repeats={args.repeats} threads={torch.get_num_threads()}\n"
        f"vllm_topk: {vllm_label}\ntriton_edit: {triton_note}\n"
        f"{NUM_PROFILES} profiles, half the rows steered; median us per call",
        flush=True,
    )
    rows = []
    for num_tokens in _int_list(args.tokens):
        for num_experts in _int_list(args.experts):
            rows.append(bench_one(num_tokens, num_experts, args, vllm_topk, triton_edit))
    print(format_table(rows))
    mismatched = [r for r in rows if r["triton_matches"] is False or r["fused_matches"] is False]
    if mismatched:
        print(f"WARNING: a Triton kernel differs from its torch reference for {len(mismatched)} "
              "shapes (triton_matches / fused_matches in the JSON)")

    if args.json:
        meta = {
            "device": args.device,
            "device_name": device_name,
            "dtype": args.dtype,
            "top_k": args.top_k,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "vllm_topk": vllm_label,
            "triton_edit": triton_note,
        }
        try:
            import vllm

            meta["vllm"] = vllm.__version__
        except Exception:
            meta["vllm"] = None
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
