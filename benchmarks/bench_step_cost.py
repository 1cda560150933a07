"""Cost of one Medusa verification step vs a plain decode step (Llama-3-8B shape, random weights, transformers).

Same code as ``medusa-plugin bench step-cost``; see benchmarks/README.md.
    python benchmarks/bench_step_cost.py --tiny                      # CPU, seconds
    python benchmarks/bench_step_cost.py --schedule-out schedule.yaml  # GPU
"""
import sys

from medusa_plugin.bench import main

if __name__ == "__main__":
    sys.exit(main(["step-cost", *sys.argv[1:]]))
