"""``python -m pnnh`` (what ``torchrun -m pnnh train ...`` runs)."""

from .cli import run

run()
