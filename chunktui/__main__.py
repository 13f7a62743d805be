"""`python -m chunktui ...` (and `torchrun --nproc-per-node K -m chunktui build ...`)."""

from chunktui.launch import main

if __name__ == "__main__":
    main()
