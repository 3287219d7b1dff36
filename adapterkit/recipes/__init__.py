"""The shipped recipes: the YAML files in this folder (found by `adapterkit.config.shipped`), and for
now the stage code that runs them."""
