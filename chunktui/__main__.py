"""`python -m chunktui ...` (and `torchrun --nproc-per-node K -m chunktui build ...`)."""

from chunktui.cli import main

if __name__ == "__main__":
    main()
