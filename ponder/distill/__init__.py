"""Self-distillation: data from the model's own answers, and the heads trained on it (EAGLE-style draft head,
Medusa heads, exit adapters). See ``data.py`` for the data and its train / held-out split."""
