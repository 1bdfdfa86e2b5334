"""DNS: a caching, forwarding resolver with local data (netsvc.dns.service), and the `netsvc dns` client."""
