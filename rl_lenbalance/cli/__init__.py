"""The `rl-lenbalance` command and what it runs: recipes, `train`, `compare`, `report`, the console and the offline
wandb reader."""
