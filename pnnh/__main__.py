"""``python -m pnnh`` (what ``torchrun -m pnnh train ...`` runs)."""

import sys

from .cli import main
from .train import distributed

try:
    main()
    code = 0
except SystemExit as e:
    code = e.code
if isinstance(code, str):
    print(code, file=sys.stderr)
    code = 1
code = code or 0
if distributed.joined():  # a torchrun worker: leave without the process group's exit-time teardown
    distributed.exit_worker(code)
sys.exit(code)
