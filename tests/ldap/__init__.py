"""LDAP tests.  Importing netsvc.ldap first filters ldaptor's pyparsing warnings for every test here."""

import netsvc.ldap  # noqa: F401
