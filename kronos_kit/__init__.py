"""kronos-kit: notebook-first, two-stage finetuning of Kronos (tokenizer first, then predictor)."""

__version__ = "0.1.0"

import logging as _logging
import sys as _sys

# A notebook-first kit: show its INFO messages (checkpoint loads, eval mode, resume, frozen-tokenizer
# checks) unless the application configured logging for "kronos_kit" itself.
_logger = _logging.getLogger(__name__)
if not _logger.handlers:
    _handler = _logging.StreamHandler(_sys.stderr)
    _handler.setFormatter(_logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(_logging.INFO)
    _logger.propagate = False
