"""``python -m demo``: the same as ``gpufleet demo``."""

from demo.cli import main

raise SystemExit(main())
