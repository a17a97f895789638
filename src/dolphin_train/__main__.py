"""`python -m dolphin_train CONFIG`: the entry point that `accelerate launch -m` and `torchrun -m` run."""

from dolphin_train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
