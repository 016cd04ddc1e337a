"""``python -m vtc``: the command line."""

from vtc.cli import main

raise SystemExit(main())
