"""The HTTPS service (services.web) and the netsvc fetch client."""
