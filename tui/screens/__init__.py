"""One module per screen; each is small and reaches the control plane only
through the app's FleetApi, in workers."""
