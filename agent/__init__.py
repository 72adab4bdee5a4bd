"""EdgeFleet device agent."""
