"""`python -m upgraderd` is the same as the `upgraderd` command."""

from upgraderd.service.cli import main

raise SystemExit(main())
