"""minimoe: a readable, fast Mixture-of-Experts GPT engine (DeepSpeed-MoE semantics) on NumPy/CuPy."""

__version__ = "0.1.0"
