"""Command-line tools that run the service's own steps without a server."""
