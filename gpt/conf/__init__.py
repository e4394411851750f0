"""The Hydra configs of the entry points (gpt/cli.py): <name>.yaml and one folder per config group."""
