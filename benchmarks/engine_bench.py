"""Engine benchmark: stock vLLM against the steering plugin, side by side, in one run.

Each configuration runs in its own subprocess (the plugin patches vLLM classes in-process):

* stock          VLLM_PLUGINS="": vLLM without the plugin;
* plugin_idle    plugin loaded, no request steered;
* steered_100    every request steered, 8 profiles mixed in each batch;
* steered_50     half the requests steered (8 profiles), half not;
* authors_eager  the SteerMoE authors' setting: eager mode (enforce_eager=True) and one
                 global mask for every request;
* stock_eager    (on request) stock vLLM in eager mode, to separate the cost of eager mode.

Every configuration measures, on random-weight checkpoints from `checkpoint_factory`
("real" shapes load with load_format="dummy"; "tiny" ones carry their random weights):

* throughput: N prompts of random token ids (`TokensPrompt`) x (input + output) tokens in one
  `generate` call, generated tokens per second;
* single-request decode speed: one short prompt alone, (M - 1) / (t(M tokens) - t(1 token)),
  which leaves prefill and request overhead out.

Prompts are fresh for each repetition and shared by all configurations (each process starts
with an empty prefix cache), so nothing measures cache hits. Results are medians over
repetitions, printed as ratios to `stock` and written as JSON.

    python -m benchmarks.engine_bench --device cpu --json engine_cpu.json
    python -m benchmarks.engine_bench --device cuda --family qwen3_moe --size real \\
        --prompts 256 --input-len 512 --output-len 128 --engine-arg attention_backend=TRITON_ATTN

`--export DIR` writes the same checkpoint (DIR/model) and the 8 profiles as profile files
(DIR/profiles/p1.json ..) for serving, e.g. to load-test with `http_load`, and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NUM_PROFILES = 8


@dataclass(frozen=True)
class Config:
    """One engine configuration."""

    name: str
    plugin: bool
    steered_fraction: float
    num_profiles: int
    eager: bool
    what: str


CONFIGS = {
    c.name: c
    for c in (
        Config("stock", False, 0.0, 0, False, "vLLM without the plugin"),
        Config("plugin_idle", True, 0.0, 0, False, "plugin loaded, nothing steered"),
        Config("steered_100", True, 1.0, NUM_PROFILES, False, "all steered, 8 profiles mixed"),
        Config("steered_50", True, 0.5, NUM_PROFILES, False, "half steered, 8 profiles"),
        Config("authors_eager", True, 1.0, 1, True, "eager mode, one global mask"),
        Config("stock_eager", False, 0.0, 0, True, "vLLM without the plugin, eager mode"),
    )
}
DEFAULT_CONFIGS = "stock,plugin_idle,steered_100,steered_50,authors_eager"

# Per device: (family, size, prompts, input len, output len, single-request tokens, repeats).
DEVICE_DEFAULTS = {
    "cpu": ("qwen3_moe", "tiny", 32, 128, 64, 128, 3),
    "cuda": ("qwen3_moe", "real", 256, 512, 128, 256, 3),
}


# ---- the workload, shared by all configurations --------------------------------------------


def make_profiles(shape: dict[str, Any], count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` inline steering specs: per MoE layer, activate up to 2 experts (at most half of
    top_k) and deactivate an eighth of the experts."""
    rng = random.Random(seed)
    num_experts, top_k = int(shape["num_experts"]), int(shape["top_k"])
    n_act = max(1, min(2, top_k // 2))
    n_deact = min(max(1, num_experts // 8), num_experts - top_k - n_act)
    profiles = []
    for _ in range(count):
        activate, deactivate = {}, {}
        for layer in shape["moe_layers"]:
            experts = rng.sample(range(num_experts), n_act + n_deact)
            activate[str(layer)] = sorted(experts[:n_act])
            deactivate[str(layer)] = sorted(experts[n_act:])
        profiles.append({"activate": activate, "deactivate": deactivate})
    return profiles


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Token-id prompts from a seeded generator (ids 10.. vocab-1, so no special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(count)]


def steering_for(config: Config, index: int, profiles: list[dict[str, Any]]) -> dict | None:
    """The steering of request `index` under `config` (None = unsteered)."""
    if config.num_profiles == 0 or config.steered_fraction <= 0:
        return None
    step = round(1 / config.steered_fraction)  # every step-th request is steered
    if index % step:
        return None
    return profiles[(index // step) % config.num_profiles]


# ---- worker: one configuration in this process -----------------------------------------------


def _sampling_params(max_tokens: int, steering: dict | None):
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=max_tokens,
        ignore_eos=True,
        temperature=0.0,
        detokenize=False,
        extra_args={"steering": steering} if steering else None,
    )


def _generate(llm: Any, prompts: list[list[int]], params: list[Any]) -> tuple[float, int]:
    """(seconds, generated tokens) of one `generate` call."""
    from vllm.inputs import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outputs)


def run_worker(spec: dict[str, Any], config: Config) -> dict[str, Any]:
    """Start one engine, measure throughput and single-request decode, return the numbers."""
    from vllm import LLM

    w = spec["workload"]
    profiles = spec["profiles"]
    kwargs: dict[str, Any] = dict(
        model=spec["checkpoint"],
        skip_tokenizer_init=True,
        dtype=spec["dtype"],
        max_model_len=w["input_len"] + max(w["output_len"], w["single_tokens"]) + 16,
        max_num_seqs=spec["max_num_seqs"],
        seed=0,
        enforce_eager=config.eager,
        **spec["engine_args"],
    )
    if spec["gpu_memory_utilization"] is not None:
        kwargs["gpu_memory_utilization"] = spec["gpu_memory_utilization"]
    if spec["size"] == "real":
        kwargs["load_format"] = "dummy"
    started = time.perf_counter()
    llm = LLM(**kwargs)
    startup_s = time.perf_counter() - started
    vocab = spec["vocab"]

    def params_for(count: int, max_tokens: int) -> list[Any]:
        return [_sampling_params(max_tokens, steering_for(config, i, profiles))
                for i in range(count)]

    # Warm-up on prompts never used again (seed space 10_000+).
    warm = random_prompts(min(w["prompts"], 8), w["input_len"], vocab, 10_000)
    _generate(llm, warm, params_for(len(warm), 4))

    throughput, decode = [], []
    single_steering = profiles[0] if config.num_profiles else None
    for rep in range(w["repeats"]):
        prompts = random_prompts(w["prompts"], w["input_len"], vocab, rep)
        seconds, tokens = _generate(llm, prompts, params_for(len(prompts), w["output_len"]))
        throughput.append({"seconds": seconds, "generated_tokens": tokens})
        long_prompt, short_prompt = random_prompts(2, w["single_input_len"], vocab, 1000 + rep)
        t_long, n_long = _generate(
            llm, [long_prompt], [_sampling_params(w["single_tokens"], single_steering)]
        )
        t_short, n_short = _generate(llm, [short_prompt], [_sampling_params(1, single_steering)])
        decode.append({"seconds": t_long - t_short, "tokens": n_long - n_short})

    gen_tps = [r["generated_tokens"] / r["seconds"] for r in throughput]
    decode_tps = [d["tokens"] / d["seconds"] for d in decode if d["seconds"] > 0]
    return {
        "config": asdict(config),
        "startup_s": startup_s,
        "throughput_tok_s": statistics.median(gen_tps),
        "throughput_samples": gen_tps,
        "decode_tok_s": statistics.median(decode_tps) if decode_tps else None,
        "decode_samples": decode_tps,
        "raw": {"throughput": throughput, "decode": decode},
    }


# ---- parent: all configurations, one engine at a time --------------------------------------


def _run_config(
    spec_path: Path, config: Config, timeout: float, logs_dir: str | None,
    extra_env: dict[str, str],
) -> dict[str, Any]:
    out = spec_path.with_name(f"result-{config.name}.json")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra_env)
    if config.plugin:
        env.pop("VLLM_PLUGINS", None)
    else:
        env["VLLM_PLUGINS"] = ""
    cmd = [sys.executable, "-m", "benchmarks.engine_bench", "--worker", str(spec_path),
           "--config", config.name, "--result", str(out)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, timeout=timeout,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"config": asdict(config), "error": f"timed out after {timeout:.0f} s"}
    log = spec_path.with_name(f"log-{config.name}.txt")
    log.write_text(f"{proc.stdout}\n{proc.stderr}")
    if logs_dir:
        Path(logs_dir).mkdir(parents=True, exist_ok=True)
        log.replace(Path(logs_dir) / log.name)
    if proc.returncode != 0 or not out.exists():
        text = f"{proc.stdout}\n{proc.stderr}"
        causes = [line for line in text.splitlines() if "Error:" in line or "Error(" in line]
        return {"config": asdict(config),
                "error": f"exit {proc.returncode}: {(causes or [text[-1000:]])[0][-1000:]}"}
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One line per configuration: absolute figures and ratios to stock."""
    stock = results.get("stock", {})
    head = ["config", "plugin", "steered", "profiles", "eager", "gen tok/s", "x stock",
            "decode tok/s", "x stock", "startup s"]
    rows = [head]
    for name, r in results.items():
        c = r["config"]
        if "error" in r:
            rows.append([name, "-", "-", "-", "-", "error", "-", "-", "-", "-"])
            continue
        tr = _ratio(r["throughput_tok_s"], stock.get("throughput_tok_s"))
        dr = _ratio(r["decode_tok_s"], stock.get("decode_tok_s"))
        rows.append([
            name,
            "yes" if c["plugin"] else "no",
            f"{c['steered_fraction']:.0%}",
            str(c["num_profiles"] or "-"),
            "yes" if c["eager"] else "no",
            f"{r['throughput_tok_s']:.1f}",
            "-" if tr is None else f"{tr:.3f}",
            "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}",
            "-" if dr is None else f"{dr:.3f}",
            f"{r['startup_s']:.0f}",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def build_spec(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Build the checkpoint and write everything a worker needs."""
    from profile_tools.checkpoint_factory import build_checkpoint, checkpoint_config, model_shape

    checkpoint = Path(args.checkpoint_dir or workdir / f"{args.family}-{args.size}")
    build_checkpoint(args.family, checkpoint, size=args.size, dtype=args.dtype)
    shape = model_shape(checkpoint)
    config = checkpoint_config(args.family, args.size, args.dtype)
    return {
        "checkpoint": str(checkpoint),
        "family": args.family,
        "size": args.size,
        "dtype": args.dtype,
        "shape": shape,
        "vocab": int(config["vocab_size"]),
        "max_num_seqs": args.max_num_seqs,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "engine_args": dict(args.engine_arg),
        "profiles": make_profiles(shape, NUM_PROFILES),
        "workload": {
            "prompts": args.prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "single_input_len": args.single_input_len,
            "single_tokens": args.single_tokens,
            "repeats": args.repeats,
        },
    }


def export_for_serving(args: argparse.Namespace, out: Path) -> None:
    """DIR/model and DIR/profiles/p1..p8.json (steermoe-profile/1) for serving.

    A "real" config gets the factory tokenizer's vocabulary and special-token ids (those of the
    tiny config), so that every generated id detokenizes; the MoE layers are unchanged.
    """
    from profile_tools.checkpoint_factory import (
        build_checkpoint,
        checkpoint_config,
        model_shape,
        padded_vocab_size,
    )

    model = build_checkpoint(args.family, out / "model", size=args.size, dtype=args.dtype)
    config_path = model / "config.json"
    config = json.loads(config_path.read_text())
    if args.size == "real":
        tiny = checkpoint_config(args.family, "tiny", args.dtype)
        token_ids = {k: tiny[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                     if k in tiny}
        config.update(vocab_size=padded_vocab_size(), **token_ids)
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        (model / "generation_config.json").write_text(json.dumps(token_ids, indent=2) + "\n")
    shape = model_shape(model)
    described = {k: shape[k] for k in ("architecture", "num_layers", "num_experts", "top_k")}
    profiles = out / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    for i, sets in enumerate(make_profiles(shape, NUM_PROFILES), start=1):
        document = {"format": "steermoe-profile/1", "name": f"p{i}", "model": described, **sets}
        (profiles / f"p{i}.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"model: {model}\nprofiles: {profiles} (p1 .. p{NUM_PROFILES})")


def _env_var(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _engine_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--family", default=None, help="checkpoint_factory family (qwen3_moe)")
    parser.add_argument("--size", choices=["tiny", "real"], default=None)
    parser.add_argument("--dtype", default=None, help="cpu: float32, cuda: bfloat16")
    parser.add_argument("--checkpoint-dir", default=None, help="build/reuse the checkpoint here")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--input-len", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=None)
    parser.add_argument("--single-input-len", type=int, default=16)
    parser.add_argument("--single-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="on CPU the share of RAM for the KV cache (default 0.2 there)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--engine-arg", type=_engine_arg, action="append", default=[],
                        metavar="KEY=VALUE", help="extra vllm.LLM argument (JSON value or str)")
    parser.add_argument("--env", type=_env_var, action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for every engine process")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--json", default=None, help="write all results here")
    parser.add_argument("--logs", default=None, help="keep each configuration's log here")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="write the checkpoint and profiles for serving to DIR and exit")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    family, size, prompts, input_len, output_len, single, repeats = DEVICE_DEFAULTS[args.device]
    args.family = args.family or family
    args.size = args.size or size
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.prompts = args.prompts or prompts
    args.input_len = args.input_len or input_len
    args.output_len = args.output_len or output_len
    args.single_tokens = args.single_tokens or single
    args.repeats = args.repeats or repeats
    args.max_num_seqs = args.max_num_seqs or max(args.prompts, 1)
    if args.gpu_memory_utilization is None and args.device == "cpu":
        args.gpu_memory_utilization = 0.2
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        result = run_worker(spec, CONFIGS[args.config])
        Path(args.result).write_text(json.dumps(result, indent=2))
        return 0
    if args.export:
        export_for_serving(args, Path(args.export))
        return 0

    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        workdir = Path(tmp)
        spec = build_spec(args, workdir)
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        w = spec["workload"]
        print(
            f"{args.family} ({args.size}, {args.dtype}) on {args.device}: "
            f"{w['prompts']} prompts x ({w['input_len']} in + {w['output_len']} out), "
            f"single request {w['single_tokens']} tokens, {w['repeats']} repetitions",
            flush=True,
        )
        results: dict[str, dict[str, Any]] = {}
        for name in args.configs.split(","):
            print(f"  {name}: {CONFIGS[name].what} ...", end=" ", flush=True)
            results[name] = _run_config(spec_path, CONFIGS[name], args.timeout, args.logs,
                                        dict(args.env))
            r = results[name]
            print(r.get("error") or f"{r['wall_s']:.0f} s", flush=True)

    print(format_table(results))
    stock = results.get("stock", {})
    ratios = {
        name: {
            "throughput": _ratio(r.get("throughput_tok_s"), stock.get("throughput_tok_s")),
            "decode": _ratio(r.get("decode_tok_s"), stock.get("decode_tok_s")),
        }
        for name, r in results.items()
    }
    if args.json:
        meta = {
            "device": args.device,
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        }
        try:
            import torch
            import vllm

            meta.update(vllm=vllm.__version__, torch=torch.__version__)
            if args.device == "cuda":
                meta["gpu"] = torch.cuda.get_device_name()
        except Exception:
            pass
        spec.pop("profiles")
        Path(args.json).write_text(json.dumps(
            {"meta": meta, "spec": spec, "results": results, "ratios_to_stock": ratios},
            indent=2,
        ))
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
