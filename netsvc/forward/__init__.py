"""Port forwarding: TCP/TLS/unix/UDP rules with balancing, health checks and PROXY protocol."""
