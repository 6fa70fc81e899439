"""The DeepSpeed-MoE layer: gate (gate.py) -> dispatch -> experts (experts.py) -> combine (layer.py)."""
