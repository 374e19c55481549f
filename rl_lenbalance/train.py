"""`accelerate launch -m rl_lenbalance.train RECIPE`: the same as `rl-lenbalance train RECIPE` (`cli.train`)."""

from .cli.train import main

if __name__ == "__main__":
    main()
