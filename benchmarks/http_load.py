"""HTTP load test for an OpenAI-compatible server (`steermoe serve`, or stock `vllm serve`).

For each concurrency level, keeps that many streaming requests in flight for a fixed number of
requests or a fixed duration, with each request's steering profile drawn from a weighted mix
(`none` = unsteered: the field is not sent). Reports request throughput, output tokens/s, time
to first token (TTFT), time per output token after the first (TPOT), inter-token latency
(ITL) and end-to-end latency percentiles, and errors; writes JSON and a PNG plot.

Traffic goes only to the URL given, and only to a loopback address unless --allow-remote.

    python -m benchmarks.http_load --url http://127.0.0.1:8000 --concurrency 1,4,16 \\
        --requests 64 --profiles none:1,concise:1 --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

PERCENTILES = (50, 90, 99)
WORDS = (
    "river", "mountain", "quiet", "engine", "yellow", "market", "garden", "silver", "window",
    "letter", "morning", "winter", "harbor", "forest", "copper", "signal", "island", "pattern",
    "thunder", "velvet", "lantern", "meadow", "canyon", "orbit",
)


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds."""

    profile: str
    ok: bool
    start: float
    latency: float
    ttft: float | None = None
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


# ---- arguments -------------------------------------------------------------------------------


def parse_weighted(text: str, what: str = "profile",
                   known: Sequence[str] | None = None) -> list[tuple[str, float]]:
    """'none:2,calm:1' -> [('none', 2.0), ('calm', 1.0)]; a bare name weighs 1. ValueError for
    a negative weight, no positive weight, or (with `known`) a name not in `known`."""
    mix = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition(":")
        if known is not None and name not in known:
            raise ValueError(f"unknown {what} {name!r}; {what}s: {', '.join(known)}")
        value = float(weight) if weight else 1.0
        if value < 0:
            raise ValueError(f"negative weight for {what} {name!r}")
        mix.append((name, value))
    if not mix or sum(w for _, w in mix) <= 0:
        raise ValueError(f"no {what} with a positive weight in {text!r}")
    return mix


def parse_profiles(text: str) -> list[tuple[str, float]]:
    """'none:2,calm:1' -> [('none', 2.0), ('calm', 1.0)]; a bare name weighs 1."""
    return parse_weighted(text, "profile")


def is_loopback(url: str) -> bool:
    """True for http(s) URLs whose host is 'localhost' or a loopback IP literal."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.http_load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a target that is not a loopback address")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="bearer token (default: $OPENAI_API_KEY)")
    parser.add_argument("--concurrency", default="1,4,16", help="levels, comma-separated")
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--requests", type=int, default=None,
                       help="requests per level (default 32)")
    bound.add_argument("--duration", type=float, default=None,
                       help="seconds per level: no new request starts after that")
    parser.add_argument("--max-requests", type=int, default=10_000,
                        help="cap on requests per level in --duration mode")
    parser.add_argument("--profiles", default="none",
                        help="weighted mix, e.g. none:1,concise:1 (none = unsteered)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=64,
                        help="length of the generated prompts, in words")
    parser.add_argument("--prompts-file", default=None,
                        help="prompts to cycle through, one per line (instead of generated)")
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="let requests stop at EOS (default: ignore_eos, fixed lengths)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request")
    parser.add_argument("--warmup", type=int, default=0, help="unrecorded requests first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="http_load.json", help="results file")
    parser.add_argument("--plot", default="http_load.png", help="PNG file ('' for none)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not (args.allow_remote or is_loopback(args.url)):
        parser.error(f"{args.url} is not a loopback address; pass --allow-remote to load-test "
                     "a remote server")
    try:
        args.concurrency_levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
        args.profile_mix = parse_profiles(args.profiles)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.concurrency_levels or min(args.concurrency_levels) < 1:
        parser.error("--concurrency needs positive integers")
    if args.requests is None and args.duration is None:
        args.requests = 32
    return args


# ---- requests ----------------------------------------------------------------------------------


class PromptSource:
    """Prompts that start differently for every request (no prefix-cache hits)."""

    def __init__(self, words: int, path: str | None, seed: int):
        self.rng = random.Random(seed)
        self.words = words
        self.lines = None
        if path:
            with open(path, encoding="utf-8") as f:
                self.lines = [line.strip() for line in f if line.strip()]
            if not self.lines:
                raise ValueError(f"{path} holds no prompts")
        self.count = 0

    def next(self) -> str:
        self.count += 1
        if self.lines:
            return f"[{self.count}] {self.lines[(self.count - 1) % len(self.lines)]}"
        body = " ".join(self.rng.choice(WORDS) for _ in range(self.words))
        return f"Request {self.count} {self.rng.getrandbits(32):08x}: {body}"


def build_payload(args: argparse.Namespace, prompt: str, profile: str) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        payload["ignore_eos"] = True
    if args.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    if profile != "none":
        payload["steering_profile"] = profile
    return payload


def _chunk_text(chunk: dict[str, Any]) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text += (delta.get("content") or "") + (delta.get("reasoning_content") or "")
        else:
            text += choice.get("text") or ""
    return text


def _error_text(body: Any) -> str:
    if isinstance(body, dict) and "error" in body:
        error = body["error"]
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    return str(body)


async def send_request(
    session: Any, url: str, payload: dict[str, Any], profile: str, headers: dict[str, str]
) -> RequestResult:
    """POST one streaming request and time its chunks."""
    start = time.perf_counter()
    result = RequestResult(profile=profile, ok=False, start=start, latency=0.0)
    arrivals: list[float] = []
    usage_tokens = None
    done = False
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            if resp.status != 200:
                raw = await resp.text()
                try:
                    message = _error_text(json.loads(raw))
                except ValueError:
                    message = raw
                result.error = f"HTTP {resp.status}: {message[:200]}"
            else:
                async for raw_line in resp.content:
                    line = raw_line.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        result.error = f"stream error: {_error_text(chunk)[:200]}"
                        break
                    if _chunk_text(chunk):
                        arrivals.append(time.perf_counter())
                    usage = chunk.get("usage")
                    if usage and usage.get("completion_tokens") is not None:
                        usage_tokens = int(usage["completion_tokens"])
                if result.error is None and not done:
                    result.error = "stream ended without [DONE]"
    except (asyncio.TimeoutError, TimeoutError):
        result.error = "timeout"
    except Exception as exc:  # connection refused/reset, bad JSON in the stream, ...
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    result.latency = time.perf_counter() - start
    if arrivals:
        result.ttft = arrivals[0] - start
        result.itl = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    result.output_tokens = usage_tokens if usage_tokens is not None else len(arrivals)
    result.ok = result.error is None
    return result


# ---- one concurrency level ---------------------------------------------------------------------


async def run_level(
    args: argparse.Namespace, concurrency: int, prompts: PromptSource, rng: random.Random,
    *, total: int | None, duration: float | None, record: bool = True,
) -> tuple[list[RequestResult], float]:
    """Keep `concurrency` requests in flight until `total` are sent or `duration` has passed."""
    import aiohttp

    url = args.url.rstrip("/") + ("/v1/chat/completions" if args.endpoint == "chat"
                                  else "/v1/completions")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    names = [name for name, _ in args.profile_mix]
    weights = [weight for _, weight in args.profile_mix]
    limit = total if total is not None else args.max_requests
    results: list[RequestResult] = []
    sent = 0
    bar = None
    if record and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"concurrency {concurrency}", unit="req", file=sys.stderr)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=concurrency)
    start = time.perf_counter()
    deadline = None if duration is None else start + duration

    async def worker(session: Any) -> None:
        nonlocal sent
        while sent < limit and (deadline is None or time.perf_counter() < deadline):
            sent += 1
            profile = rng.choices(names, weights)[0]
            payload = build_payload(args, prompts.next(), profile)
            results.append(await send_request(session, url, payload, profile, headers))
            if bar is not None:
                bar.update(1)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return results, wall


# ---- statistics --------------------------------------------------------------------------------


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """p50/p90/p99 (linear interpolation), mean and max, times `scale` (s -> ms)."""
    import numpy as np

    if not values:
        return {**{f"p{p}": None for p in PERCENTILES}, "mean": None, "max": None}
    array = np.asarray(values, dtype=float) * scale
    out: dict[str, float | None] = {
        f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES
    }
    out["mean"] = float(array.mean())
    out["max"] = float(array.max())
    return out


def summarize(results: list[RequestResult], wall: float) -> dict[str, Any]:
    """Throughput, latency percentiles (ms) and errors of one level."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    errors = Counter(r.error for r in results if not r.ok)
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "duration_s": wall,
        "request_throughput": len(ok) / wall if wall > 0 else 0.0,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_ms": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": percentiles([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": percentiles([gap for r in ok for gap in r.itl]),
        "latency_ms": percentiles([r.latency for r in ok]),
        "error_kinds": dict(errors.most_common(10)),
    }


def summarize_level(results: list[RequestResult], wall: float, concurrency: int) -> dict:
    level = {"concurrency": concurrency, **summarize(results, wall)}
    by_profile: dict[str, list[RequestResult]] = {}
    for r in results:
        by_profile.setdefault(r.profile, []).append(r)
    level["per_profile"] = {
        name: {
            key: value
            for key, value in summarize(rs, wall).items()
            if key in ("requests", "ok", "errors", "ttft_ms", "tpot_ms", "error_kinds")
        }
        for name, rs in sorted(by_profile.items())
    }
    return level


def format_table(levels: list[dict[str, Any]]) -> str:
    def trio(stats: dict[str, float | None]) -> str:
        return "/".join("-" if stats[f"p{p}"] is None else f"{stats[f'p{p}']:.0f}"
                        for p in PERCENTILES)

    head = ["conc", "reqs", "ok", "err", "req/s", "out tok/s", "TTFT p50/90/99 ms",
            "TPOT p50/90/99 ms", "ITL p50/90/99 ms"]
    rows = [head]
    for lv in levels:
        rows.append([
            str(lv["concurrency"]), str(lv["requests"]), str(lv["ok"]), str(lv["errors"]),
            f"{lv['request_throughput']:.2f}", f"{lv['output_tokens_per_s']:.1f}",
            trio(lv["ttft_ms"]), trio(lv["tpot_ms"]), trio(lv["itl_ms"]),
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(levels: list[dict[str, Any]], path: str, title: str) -> None:
    """Throughput and latency percentiles against concurrency, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [lv["concurrency"] for lv in levels]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    axes[0][0].plot(conc, [lv["output_tokens_per_s"] for lv in levels], "o-")
    axes[0][0].set_ylabel("output tokens/s")
    axes[0][1].plot(conc, [lv["request_throughput"] for lv in levels], "o-")
    axes[0][1].set_ylabel("requests/s")
    for ax, key, label in ((axes[1][0], "ttft_ms", "TTFT (ms)"),
                           (axes[1][1], "tpot_ms", "TPOT (ms)")):
        for p in PERCENTILES:
            values = [lv[key][f"p{p}"] for lv in levels]
            ax.plot(conc, [float("nan") if v is None else v for v in values], "o-",
                    label=f"p{p}")
        ax.set_ylabel(label)
        ax.legend()
    for ax in axes.flat:
        ax.set_xlabel("concurrency")
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------


async def _model_id(args: argparse.Namespace) -> str:
    import aiohttp

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        url = args.url.rstrip("/") + "/v1/models"
        async with session.get(url, headers=headers) as resp:
            resp.raise_for_status()
            data = await resp.json()
    return str(data["data"][0]["id"])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole sweep; returns the JSON document."""
    if args.model is None:
        args.model = await _model_id(args)
    prompts = PromptSource(args.prompt_words, args.prompts_file, args.seed)
    rng = random.Random(args.seed)
    if args.warmup:
        await run_level(args, min(args.warmup, max(args.concurrency_levels)), prompts, rng,
                        total=args.warmup, duration=None, record=False)
    levels = []
    for concurrency in args.concurrency_levels:
        results, wall = await run_level(args, concurrency, prompts, rng,
                                        total=args.requests, duration=args.duration)
        levels.append(summarize_level(results, wall, concurrency))
    settings = {k: v for k, v in vars(args).items() if k not in ("api_key", "profile_mix")}
    return {"settings": settings, "levels": levels}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    levels = report["levels"]
    print(format_table(levels))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(levels, args.plot, f"{args.model} @ {args.url} ({args.endpoint}, "
                                f"profiles {args.profiles})")
        print(f"wrote {args.plot}")
    return 0 if all(lv["ok"] > 0 for lv in levels) else 1


__all__ = ["RequestResult", "main", "percentiles", "run", "summarize", "summarize_level"]

if __name__ == "__main__":
    sys.exit(main())
