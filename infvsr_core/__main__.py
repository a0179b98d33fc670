"""`python -m infvsr_core upscale INPUT -o OUTPUT`: see `infvsr_core.cli`."""

from .cli import main

raise SystemExit(main())
