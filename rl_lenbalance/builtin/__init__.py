"""What the demo and the tests train: the embedded SmolLM2 (`models`) and the built-in tasks (`tasks`)."""
