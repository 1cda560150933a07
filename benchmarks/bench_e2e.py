"""Tokens/step, TPOT and output tokens/s with and without Medusa (tree and chain) at several concurrencies.

Same code as ``medusa-plugin bench e2e``; see benchmarks/README.md.
    python benchmarks/bench_e2e.py --tiny --engine reference   # CPU, reference decoder
    python benchmarks/bench_e2e.py --engine vllm               # through the vLLM engine with the Medusa plugin
"""
import sys

from medusa_plugin.bench import main

if __name__ == "__main__":
    sys.exit(main(["e2e", *sys.argv[1:]]))
