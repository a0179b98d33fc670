"""`python -m infvsr_core upscale INPUT -o OUTPUT`: see `infvsr_core.cli`."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python starts: one line, not a traceback
    print("interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
