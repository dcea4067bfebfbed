"""Each model family's spec, one module per family: what ``tabtune ls``, ``train --help`` and config
validation read (config schema, tasks, limits, sizes, checkpoint files). Nothing here imports torch or a
model package; ``models/<name>.py`` holds the adapter, which subclasses its spec."""
