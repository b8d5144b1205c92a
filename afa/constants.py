"""Constants shared by afa.data, afa.ops and afa.metrics, in a module that imports nothing,
so that the layers can agree without importing each other."""

# Label of pixels (and affinity pairs) that no loss or metric counts.
IGNORE_INDEX: int = 255
