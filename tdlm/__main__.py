"""`python -m tdlm ...` (what `accelerate launch -m tdlm run RECIPE` runs on each process)."""

from tdlm.cli import main

main()
