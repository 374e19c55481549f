"""Generation: the decode loop (`decode`), the capture of hidden states while it runs (`capture`), the predictor at
run time (`engine`: predicts, learns online, falls back) and a round's orchestration (`rollout`). Framework-free."""
