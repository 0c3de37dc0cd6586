"""The ``dropbp`` application: the CLI, the fine-tuning job, bundled model and data, plots.

The library core (``dropbp``) imports only torch; this subpackage brings in
transformers, PEFT and matplotlib.
"""

import logging as _logging


class _IrrelevantNotice(_logging.Filter):
    """Drops one notice, logged on import by a library the job imports, that does not concern the run."""

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


# bitsandbytes (which PEFT imports for every LoRA run): its optional CPU 4-bit inference kernel is
# missing. The job never runs it: it has no autograd formula, and dropbp.app.models._no_cpu_packing
# keeps 4-bit layers off it.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_IrrelevantNotice("Failed to load CPU gemm_4bit_forward"))
# DeepSpeed, where installed (transformers imports it to check for it): no GPU found. --device says
# where the job runs, and the summary line says it again.
_logging.getLogger("DeepSpeed").addFilter(_IrrelevantNotice("Setting accelerator to CPU"))

import warnings as _warnings

# PEFT, saving the adapter of a model loaded from a GGUF file (the bundled one): no config file to
# compare the vocabulary with. The job never trains the embeddings, so the vocabulary is unchanged.
_warnings.filterwarnings("ignore", message=r"Could not find a config file in .* will assume that the vocabulary "
                         r"was not modified", category=UserWarning)
