"""`python -m cluster` is the `ike-cluster` command."""

from .cli import main

raise SystemExit(main())
