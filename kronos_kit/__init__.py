"""kronos-kit: notebook-first, two-stage finetuning of Kronos (tokenizer first, then predictor)."""

__version__ = "0.1.0"

import logging as _logging
import sys as _sys
import warnings as _warnings


class _KitLogHandler(_logging.Handler):
    """INFO lines to stdout inside a Jupyter kernel (plain output, not a pink error box), warnings and errors
    to stderr; outside a kernel everything to stderr. The stream is looked up at each line, as Jupyter swaps it."""

    def emit(self, record: _logging.LogRecord) -> None:
        in_kernel = "ipykernel" in _sys.modules
        stream = _sys.stdout if in_kernel and record.levelno < _logging.WARNING else _sys.stderr
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # a closed stream must not break training
            self.handleError(record)


# A notebook-first kit: show its INFO messages (checkpoint loads, eval mode, resume, frozen-tokenizer
# checks) unless the application configured logging for "kronos_kit" itself.
_logger = _logging.getLogger(__name__)
if not _logger.handlers:
    _handler = _KitLogHandler()
    _handler.setFormatter(_logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(_logging.INFO)
    _logger.propagate = False

_formatwarning = _warnings.formatwarning


def _format_kit_warning(message, category, filename, lineno, line=None):  # noqa: ANN001, ANN202 (warnings' signature)
    """The kit's own notices (e.g. `DataNotice`) as one line, without the Python source line warnings adds."""
    if getattr(category, "__module__", "").startswith(__name__ + "."):
        return f"{category.__name__}: {message}\n"
    return _formatwarning(message, category, filename, lineno, line)


_warnings.formatwarning = _format_kit_warning
