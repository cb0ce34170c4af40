"""``python -m nvae_fast``: the command-line interface (same as the ``nvae-fast`` command)."""

from nvae_fast.cli import main

raise SystemExit(main())
