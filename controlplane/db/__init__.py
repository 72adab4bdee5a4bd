"""SQL storage: typed models, engine set-up and the unit of work."""
