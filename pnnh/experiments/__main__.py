"""``python -m pnnh.experiments '<spec JSON>'``: one run of a grid in a worker process (see :mod:`.worker`)."""

from .worker import main

main()
