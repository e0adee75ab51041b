"""The daemon through its socket: server, contexts, runners, reconnects, the fleet."""
