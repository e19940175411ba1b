"""One engine of `benchmarks.gpu_check`, in its own process: start it, run its tasks, report.

    python -m benchmarks.gpu_check_worker SPEC.json RESULT.json

SPEC (written by `gpu_check`): `engine_args` for `vllm.LLM`, and `tasks`:

* `mixed`: one batch of unsteered requests, requests steered by two profiles (from
  `STEERMOE_PROFILE_DIR`) and one inline, greedy with `ignore_eos`, top-2 logprobs and (with
  the plugin) routing capture; every request's prompt, tokens, logprobs and routing.
* `rates`: generation throughput and single-request decode speed of several workloads in the
  same engine (fresh random-token prompts for every workload and repetition, `ignore_eos`),
  repetitions interleaved across workloads.

and optionally `reference`: after the engine is shut down, the `mixed` requests are checked
against the checkpoint in Hugging Face transformers with the SteerMoE edit
(`tests.support.hf_reference`, float32 on the CPU): routing agreement, the greedy tokens
(teacher-forced) and the generated tokens' logprobs.

RESULT is rewritten after every task, so a job stopped by its time limit keeps what it did.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.engine_bench import Config, random_prompts, steering_for


def _write(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def _logprobs(sample: Any) -> list[list[list[float]]]:
    """Per generated position: [[token, logprob], ...] by rank (top-2 and the chosen one)."""
    rows = []
    for entry in sample.logprobs or []:
        ranked = sorted(entry.items(), key=lambda item: (item[1].rank or 0, -item[1].logprob))
        rows.append([[int(token), float(lp.logprob)] for token, lp in ranked])
    return rows


def run_mixed(llm: Any, task: dict[str, Any], plugin: bool) -> dict[str, Any]:
    """The correctness batch; the stock engine gets the same prompts without steering."""
    from vllm import SamplingParams

    requests = task["requests"]
    params = []
    for request in requests:
        extra: dict[str, Any] = {}
        if plugin:
            extra["capture_routing"] = True
            if request.get("profile"):
                extra["steering_profile"] = request["profile"]
            if request.get("inline"):
                extra["steering"] = request["inline"]
        params.append(SamplingParams(
            max_tokens=task["max_tokens"], temperature=0.0, ignore_eos=True,
            logprobs=task.get("logprobs", 2), detokenize=task.get("detokenize", True),
            extra_args=extra or None))
    from vllm.inputs import TokensPrompt

    # Text prompts for checkpoints with a tokenizer; token ids for dummy-weight shapes.
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_ids"]) if "prompt_ids" in r
               else r["prompt"] for r in requests]
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    routing: dict[str, Any] = {}
    if plugin:
        from vllm_patches.routing_capture import fetch_routing

        routing = fetch_routing(llm, [o.request_id for o in outputs])
    results = {}
    for request, output in zip(requests, outputs, strict=True):
        sample = output.outputs[0]
        record = routing.get(output.request_id)
        results[request["name"]] = {
            "prompt_ids": list(output.prompt_token_ids),
            "output_ids": list(sample.token_ids),
            "logprobs": _logprobs(sample),
            "routing": None if record is None else record.expert_ids.tolist(),
            "routing_layers": None if record is None else list(record.moe_layers),
        }
    return {"seconds": seconds, "requests": results}


def _sampling(max_tokens: int, steering: dict[str, Any] | None) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                          temperature=0.0, detokenize=False,
                          extra_args={"steering": steering} if steering else None)


def _generate(llm: Any, prompts: list[list[int]], params: list[Any]) -> tuple[float, int]:
    from vllm.inputs import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    started = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    return time.perf_counter() - started, sum(len(o.outputs[0].token_ids) for o in outputs)


def run_rates(llm: Any, task: dict[str, Any], on_progress: Any = None) -> dict[str, Any]:
    """Throughput and single-request decode per workload; medians over repetitions.

    Workload i, repetition r uses prompts seeded (r * 100 + i) (and 1000 + that for the
    single request): fresh within the engine, and the same in every engine that runs a
    workload at the same place, so stock and plugin engines see the same prompts.
    """
    w = task["workload"]
    profiles = task["profiles"]
    vocab = int(task["vocab"])
    workloads = task["workloads"]
    configs = {
        wl["name"]: Config(wl["name"], True, float(wl["steered_fraction"]),
                           int(wl["num_profiles"]), False, "")
        for wl in workloads
    }

    def params_for(name: str, count: int, max_tokens: int) -> list[Any]:
        return [_sampling(max_tokens, steering_for(configs[name], i, profiles))
                for i in range(count)]

    warm = random_prompts(min(w["prompts"], 8), w["input_len"], vocab, 90_000)
    for wl in workloads:  # every workload once, so steered kernels run before timing
        _generate(llm, warm, params_for(wl["name"], len(warm), 4))
    samples: dict[str, dict[str, list[Any]]] = {
        wl["name"]: {"throughput": [], "decode": []} for wl in workloads
    }
    for rep in range(int(w["repeats"])):
        for index, wl in enumerate(workloads):
            name = wl["name"]
            seed = rep * 100 + index
            prompts = random_prompts(w["prompts"], w["input_len"], vocab, seed)
            seconds, tokens = _generate(llm, prompts, params_for(name, len(prompts),
                                                                 w["output_len"]))
            samples[name]["throughput"].append({"seconds": seconds, "tokens": tokens})
            single = profiles[0] if configs[name].num_profiles else None
            long_prompt, short_prompt = random_prompts(2, w["single_input_len"], vocab,
                                                       1000 + seed)
            t_long, n_long = _generate(llm, [long_prompt], [_sampling(w["single_tokens"],
                                                                      single)])
            t_short, n_short = _generate(llm, [short_prompt], [_sampling(1, single)])
            samples[name]["decode"].append({"seconds": t_long - t_short,
                                            "tokens": n_long - n_short})
            if on_progress is not None:
                on_progress(summarise_rates(samples))
    return summarise_rates(samples)


def summarise_rates(samples: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    out = {}
    for name, runs in samples.items():
        gen = [r["tokens"] / r["seconds"] for r in runs["throughput"] if r["seconds"] > 0]
        dec = [d["tokens"] / d["seconds"] for d in runs["decode"] if d["seconds"] > 0]
        out[name] = {
            "throughput_tok_s": statistics.median(gen) if gen else None,
            "throughput_samples": gen,
            "decode_tok_s": statistics.median(dec) if dec else None,
            "decode_samples": dec,
            "raw": runs,
        }
    return out


# ---- the Hugging Face reference -------------------------------------------------------------


def _steering_sets(request: dict[str, Any]) -> dict[int, tuple[list[int], list[int]]] | None:
    sets = request.get("sets")
    if not sets:
        return None
    return {int(layer): (list(a), list(d)) for layer, (a, d) in sets.items()}


def run_reference(spec: dict[str, Any], mixed: dict[str, Any]) -> dict[str, Any]:
    """Each request against transformers with the SteerMoE edit (float32, CPU)."""
    import numpy as np
    import torch

    from tests.support.hf_reference import hf_routing, hf_steered_logits

    eps = float(spec["reference"]["eps"])
    tie = float(spec["reference"]["tie_tolerance"])
    checkpoint = spec["engine_args"]["model"]
    out = {}
    for request in spec["tasks"][0]["requests"]:
        got = mixed["requests"][request["name"]]
        steering = _steering_sets(request)
        sequence = got["prompt_ids"] + got["output_ids"][:-1]
        logits = hf_steered_logits(checkpoint, sequence, steering, eps)
        reference = torch.log_softmax(logits.float(), dim=-1)
        start = len(got["prompt_ids"]) - 1
        # Teacher-forced: every position is conditioned on the engine's own sequence, so each
        # generated token must be the reference's greedy choice, or within `tie` of it.
        differences = []
        worst_lp = 0.0
        for j, token in enumerate(got["output_ids"]):
            row = reference[start + j]
            best = int(row.argmax())
            if best != token:
                differences.append({"position": j, "gap": float(row[best] - row[token])})
            chosen = got["logprobs"][j] if j < len(got["logprobs"]) else []
            lp = next((v for t, v in chosen if t == token), None)
            if lp is not None:
                worst_lp = max(worst_lp, abs(lp - float(row[token])))
        entry: dict[str, Any] = {
            "token_differences": differences,
            "tokens_ok": all(d["gap"] <= tie for d in differences),
            "max_logprob_diff": worst_lp,
        }
        if got["routing"] is not None:
            expected = np.sort(hf_routing(checkpoint, sequence, steering, eps), axis=-1)
            engine = np.sort(np.asarray(got["routing"]), axis=-1)
            entry["routing_agreement"] = (
                float((engine == expected).all(axis=-1).mean())
                if engine.shape == expected.shape else 0.0)
            entry["routing_shapes"] = [list(engine.shape), list(expected.shape)]
        out[request["name"]] = entry
    return out


# ---- main -----------------------------------------------------------------------------------


def _engine_info() -> dict[str, Any] | None:
    directory = os.environ.get("STEERMOE_RUNTIME_DIR")
    found = sorted(Path(directory).glob("engine*.json"), key=lambda p: p.stat().st_mtime_ns) \
        if directory else []
    return json.loads(found[-1].read_text()) if found else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    result_path = Path(argv[1])
    result: dict[str, Any] = {"tasks": {}, "pid": os.getpid()}
    plugin = os.environ.get("VLLM_PLUGINS", None) != ""
    llm = None
    try:
        from vllm import LLM

        started = time.perf_counter()
        llm = LLM(**spec["engine_args"])
        result["startup_s"] = time.perf_counter() - started
        result["engine_info"] = _engine_info() if plugin else None
        _write(result_path, result)
        for task in spec["tasks"]:
            if task["kind"] == "mixed":
                result["tasks"]["mixed"] = run_mixed(llm, task, plugin)
            elif task["kind"] == "rates":
                def progress(rates: dict[str, Any]) -> None:
                    result["tasks"]["rates"] = {"partial": True, "workloads": rates}
                    _write(result_path, result)

                rates = run_rates(llm, task, progress)
                result["tasks"]["rates"] = {"partial": False, "workloads": rates}
            else:
                raise ValueError(f"unknown task kind {task['kind']!r}")
            _write(result_path, result)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-4000:]
    finally:
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    if "error" not in result and spec.get("reference") and "mixed" in result["tasks"]:
        try:
            result["reference"] = run_reference(spec, result["tasks"]["mixed"])
        except Exception as exc:
            result["reference_error"] = f"{type(exc).__name__}: {exc}"
            result["traceback"] = traceback.format_exc()[-4000:]
    result["done"] = True
    _write(result_path, result)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
