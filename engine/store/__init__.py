"""What lives on disk: the workspace, config, results files, the checkpoint registry, the held-out split."""
