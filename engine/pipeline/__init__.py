"""What runs stages: the runner, the cost estimate, wandb logging."""
