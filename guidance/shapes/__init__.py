"""The shapes world: a generated text-to-image world and the tiny models trained on it (the embedded default).

`world` (generator), `tokenizer`, `scorer` (attribute classifier), `train` (training commands), `assets` (loading).
"""
