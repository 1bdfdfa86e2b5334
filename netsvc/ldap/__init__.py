"""
LDAP: the C{services.ldap} directory (served from LDIF files) and the C{netsvc ldap}
client.

ldaptor is the LDAP library underneath.  Importing C{ldaptor.ldapfilter} with
pyparsing 3.3 emits ~57 C{PyparsingDeprecationWarning}s (ldaptor 21.2 uses the
pre-3.0 camelCase names); they are filtered here, once, for ldaptor's modules only,
so that anything under C{netsvc.ldap} may import ldaptor freely.
"""

from __future__ import annotations

import warnings

try:
    from pyparsing import PyparsingDeprecationWarning
except ImportError:  # pyparsing < 3.3 has no such warning
    pass
else:
    warnings.filterwarnings("ignore", category=PyparsingDeprecationWarning, module=r"ldaptor(\.|$)")
    warnings.filterwarnings("ignore", category=PyparsingDeprecationWarning, module=r"pyparsing(\.|$)")
