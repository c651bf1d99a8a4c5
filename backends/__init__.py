"""Model backends, one module per adapter: ``toy``, ``llama_cpp``, ``hf``.

Each module registers its backend through the ``register_backends`` hook and
imports its heavy dependency only when a model is loaded.
"""
