"""What a running stage uses: its context, the events it yields, the training lifecycle and step."""
