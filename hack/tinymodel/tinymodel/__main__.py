"""CLI: python -m tinymodel --out DIR [--preset tiny|bench] [--seed N]."""

from tinymodel import main

raise SystemExit(main())
