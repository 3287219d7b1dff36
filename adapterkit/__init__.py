"""adapterkit: fine-tune language models on one consumer GPU, with recipes that run end to end.

Entry points: the `adapterkit` CLI (`adapterkit.cli`), `adapterkit.config.load_recipe` and
`adapterkit.recipes.train.run`.
"""

__version__ = "0.1.0"
