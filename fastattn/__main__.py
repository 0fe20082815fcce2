"""``python -m fastattn``: the ``fastattn`` command (the harness's jobs by name; ``--help`` lists them)."""

import sys

try:
    from fastattn.experiments.cli import main
except ModuleNotFoundError as error:  # a checkout on an environment installed before the harness shipped
    if not (error.name or "").startswith("fastattn.experiments"):
        raise
    sys.exit("fastattn: the harness is not installed with this fastattn (reinstall: pip install -e <checkout>; "
             "from a checkout's root, python -m experiments.run also works)")

main()
