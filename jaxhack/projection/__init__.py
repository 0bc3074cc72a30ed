"""v_hack (the reward-hacking direction per adapter module), cosines against it, and the optax
projection that removes it (docs/projection.md)."""
from jaxhack.projection.cosines import (aggregate, directions, gradient_cosines, module_cosines,
                                        per_sample_cosines)
from jaxhack.projection.modules import (adapter_kind, from_module_vectors, module_dims, module_key,
                                        to_module_vectors)
from jaxhack.projection.optax_projection import (HackProjectionState, chain_with_projection,
                                                 find_projection_state, hack_projection,
                                                 projection_metrics)
from jaxhack.projection.pairs import (Pair, clean_vs_clean_pairs, pairs_from_pools, pairs_from_templates,
                                      read_pairs_jsonl, shuffle_labels, swap_labels, write_pairs_jsonl)
from jaxhack.projection.v_hack import (export_safetensors, extract_v_hack, load_safetensors, load_v_hack,
                                       n_valid, pair_grad_diffs, random_v_hack, save_v_hack,
                                       v_hack_from_diffs)

__all__ = [
    "aggregate", "directions", "gradient_cosines", "module_cosines", "per_sample_cosines",
    "adapter_kind", "from_module_vectors", "module_dims", "module_key", "to_module_vectors",
    "HackProjectionState", "chain_with_projection", "find_projection_state", "hack_projection",
    "projection_metrics",
    "Pair", "clean_vs_clean_pairs", "pairs_from_pools", "pairs_from_templates", "read_pairs_jsonl",
    "shuffle_labels", "swap_labels", "write_pairs_jsonl",
    "export_safetensors", "extract_v_hack", "load_safetensors", "load_v_hack", "n_valid",
    "pair_grad_diffs", "random_v_hack", "save_v_hack", "v_hack_from_diffs",
]
