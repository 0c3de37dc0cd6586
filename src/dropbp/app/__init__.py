"""The ``dropbp`` application: the CLI, the fine-tuning job, bundled model and data, plots.

The library core (``dropbp``) imports only torch; this subpackage brings in
transformers, PEFT and matplotlib.
"""
