"""Keeps the training progress readable: chatty libraries log WARNING+ only."""

from absl import logging

# Libraries whose INFO logs drown the training progress (clu's platform
# logs its own progress notes, with an ETA of one phase's rate: ours is
# train.py's progress line).
_QUIET = (
    '/orbax/',
    '/grain/',
    '/tensorflow_datasets/',
    '/jax/_src/',
    '/clu/platform/',
)


# Warnings that describe intended behaviour, not a fault: orbax announces
# every read-only checkpoint manager (evaluation and prediction open the
# checkpoints read-only on purpose).
_EXPECTED_WARNINGS = (('/orbax/', 'Given directory is read only'),)


class QuietLibraries(logging.logging.Filter):
  """Drops INFO records emitted from the files of chatty libraries, and
  their warnings about what we do on purpose."""

  def filter(self, record):
    for where, text in _EXPECTED_WARNINGS:
      if where in record.pathname and str(record.msg).startswith(text):
        return False
    return record.levelno >= logging.logging.WARNING or not any(
        q in record.pathname for q in _QUIET
    )


def install() -> None:
  """Adds the filter to absl's handler (call inside ``app.run``)."""
  logging.get_absl_handler().addFilter(QuietLibraries())
