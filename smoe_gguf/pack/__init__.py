"""The pack: `split` a MoE GGUF into a dense core + per-leaf shards, `verify` it, `merge` it back."""
