"""One SmolLM2 `generate` (16 rows, 32 sampled tokens) timed in the main thread and in a fresh Python thread, in
alternation (the first call is warm-up). On a CPU, torch runs the same ops slower outside the main thread, which is
where `rl-lenbalance compare` ran each trainer until it gave each a process of its own (December 2026).

    cd benchmarks && python thread_generate.py --repeats 4 --out ../docs/benchmarks/thread_generate_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import save_report  # noqa: E402

from rl_lenbalance.builtin.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, tokenizer = load_model("embedded:smollm2-135m-instruct", dtype=torch.float32)
    batch = tokenizer(["What is 12 + 35? Think step by step."] * 16, return_tensors="pt", padding=True)

    def generate() -> float:
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=True, top_k=0)
        return time.perf_counter() - start

    def in_thread() -> float:
        box: dict[str, float] = {}
        thread = threading.Thread(target=lambda: box.update(seconds=generate()))
        thread.start()
        thread.join()
        return box["seconds"]

    generate()
    seconds: dict[str, list[float]] = {"main_thread": [], "other_thread": []}
    for i in range(args.repeats):
        for name in (("main_thread", "other_thread") if i % 2 == 0 else ("other_thread", "main_thread")):
            seconds[name].append(generate() if name == "main_thread" else in_thread())
    main_median = statistics.median(seconds["main_thread"])
    results = [{"where": name, "seconds": s, "median_s": statistics.median(s),
                "slowdown_vs_main": statistics.median(s) / main_median} for name, s in seconds.items()]
    for result in results:
        print(result["where"], round(result["median_s"], 3), f"{result['slowdown_vs_main']:.2f}x")
    save_report(args.out, results, {"rows": 16, "new_tokens": args.tokens, "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
