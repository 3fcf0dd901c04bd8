"""Logical axis names for parameters and activations.

Model code names axes with these constants only; `sharding.py` maps them to mesh axes through its
rules table. Activation names are kept distinct from weight names so that, for example, the batch
of an activation and the rows of a memory table can be placed independently.
"""

# Activations.
BATCH = "activation_batch"
LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_STREAMS = "activation_streams"
ACT_HEADS = "activation_heads"
ACT_KV_HEADS = "activation_kv_heads"
ACT_MLP = "activation_mlp"
ACT_VOCAB = "activation_vocab"
ACT_MEMORY_HEADS = "activation_memory_heads"
ACT_EXPERTS = "activation_experts"

# Weights.
EMBED = "embed"
VOCAB = "vocab"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
LATENT = "latent"
EXPERTS = "experts"
STREAMS = "streams"
HC_COEFFS = "hc_coeffs"
CONV_WIDTH = "conv_width"
NORM = "norm"
LAYERS = "layers"

# Engram memory tables: rows are what gets sharded across devices; width stays whole.
TABLE_ROWS = "table_rows"
MEMORY_WIDTH = "memory_width"
MEMORY_IN = "memory_in"
# OverEncoding sub-tables and UltraMem value blocks: few, never sharded.
MEMORY_TABLES = "memory_tables"
