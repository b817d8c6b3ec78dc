"""The bot: CLI, web app, store and service wiring."""
