"""The EMO-style portrait animation model. Knows nothing about networks or transports."""
