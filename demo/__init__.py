"""The newcomer's end-to-end run (``make demo``): franca training and evaluation, then RASA on top."""
