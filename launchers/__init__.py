"""The singa-launch command."""
