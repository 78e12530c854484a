"""Shared edge code of the `script:` wrappers: logging into the rule's log file."""
from __future__ import annotations

import contextlib
import logging
import sys


@contextlib.contextmanager
def rule_logging(snakemake):
    """Send logging, warnings and stderr (tqdm progress) to the rule's log; re-raise errors.

    The error's message also goes to the log's last line, so `snakemake` prints it plainly.
    """
    log_path = snakemake.log[0]
    with open(log_path, "w", buffering=1) as fh:
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        old_err = sys.stderr
        sys.stderr = fh
        try:
            yield logging.getLogger("cfga.workflow")
        except Exception as err:
            logging.getLogger("cfga.workflow").error("%s: %s", type(err).__name__, err)
            sys.stderr = old_err
            print(f"ERROR ({snakemake.rule}): {err}", file=old_err)
            raise
        finally:
            sys.stderr = old_err
