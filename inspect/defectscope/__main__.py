"""`python -m defectscope` is the same as the `defectscope` console script."""

from .cli import main

raise SystemExit(main())
