"""One engine step at batch 1 split into phases (plain, Medusa, vLLM ngram) and step cost vs rows per step.

Same code as ``medusa-plugin bench overhead``; see benchmarks/README.md.
    python benchmarks/bench_overhead.py --model MODEL_DIR --heads HEADS_DIR
"""
import sys

from medusa_plugin.bench import main

if __name__ == "__main__":
    sys.exit(main(["overhead", *sys.argv[1:]]))
