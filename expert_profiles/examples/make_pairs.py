"""Write `digits_vs_words.jsonl`: arithmetic answered in digits (side 1) or in words (side 2).

Both sides ask the same question; only the assistant's answer differs, so the statistics
contrast how the model writes numbers. Deterministic (fixed seed).

    python -m expert_profiles.examples.make_pairs [OUT.jsonl] [--count N]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).with_name("digits_vs_words.jsonl")
DEFAULT_COUNT = 60

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

# (question templates, symbol, word) per operation
_OPERATIONS = {
    "add": (["What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}."], "+", "plus"),
    "sub": (["What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}."], "-",
            "minus"),
    "mul": (["What is {a} x {b}?", "What is {a} times {b}?", "Multiply {a} by {b}."], "x",
            "times"),
}


def number_words(n: int) -> str:
    """English words for 0 <= n < 1000."""
    if not 0 <= n < 1000:
        raise ValueError(f"{n} is out of range")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    head = f"{_ONES[hundreds]} hundred"
    return head if rest == 0 else f"{head} and {number_words(rest)}"


def make_pair(index: int, rng: random.Random) -> dict:
    operation = ("add", "sub", "mul")[index % 3]
    templates, symbol, word = _OPERATIONS[operation]
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    if operation == "sub" and b > a:
        a, b = b, a
    if operation == "mul":
        a, b = rng.randint(2, 20), rng.randint(2, 12)
    result = {"add": a + b, "sub": a - b, "mul": a * b}[operation]
    question = rng.choice(templates).format(a=a, b=b)
    messages = [{"role": "user", "content": question}]
    in_words = f"{number_words(a)} {word} {number_words(b)} is {number_words(result)}."
    return {
        "id": f"{operation}-{a}-{b}-{index}",
        "side1": {"messages": messages, "target": f"{a} {symbol} {b} = {result}."},
        "side2": {"messages": messages, "target": in_words[0].upper() + in_words[1:]},
    }


def write_pairs(path: str | Path = DEFAULT_OUT, count: int = DEFAULT_COUNT,
                seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [json.dumps(make_pair(i, rng), ensure_ascii=False) for i in range(count)]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=str(DEFAULT_OUT))
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT)
    args = parser.parse_args(argv)
    print(write_pairs(args.out, args.count))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
