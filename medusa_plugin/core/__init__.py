"""Engine-independent Medusa algorithms: heads, trees, acceptance, paged tree attention, KV compaction, config.

Nothing under this package may import vLLM (``tests/test_core_is_engine_independent.py`` checks it).
"""
