"""
netsvc: everyday network services in one Twisted daemon, and their clients.

Public API (what C{etc/netsvc.tac} uses): L{netsvc.config} (settings classes,
L{netsvc.config.load}) and L{netsvc.runtime.buildDaemon}.
"""

__version__ = "0.1.0"
