"""Logical axis names: the only sharding vocabulary model code speaks.

Parameters and key activations are annotated with these names; switchx.parallel.rules maps them onto the
(data, expert, model) mesh in one table.
"""

BATCH = "batch"              # examples (and routing groups before dispatch): split over data and expert
LENGTH = "length"            # sequence positions
EMBED = "embed"              # d_model
HEADS = "heads"              # attention heads
KV = "kv"                    # per-head dimension
MLP = "mlp"                  # dense feed-forward hidden units
VOCAB = "vocab"              # vocabulary
RELPOS = "relpos_buckets"    # relative position buckets
EXPERT = "expert"            # experts
EXPERT_MLP = "expert_mlp"    # hidden units inside each expert
EXPERT_GROUP = "expert_group"  # routing groups after dispatch (the expert axis now holds experts, not tokens)
UNMODELED = "unmodeled"      # never sharded (router outputs, capacity slots, ...)

ALL = (BATCH, LENGTH, EMBED, HEADS, KV, MLP, VOCAB, RELPOS, EXPERT, EXPERT_MLP, EXPERT_GROUP, UNMODELED)
