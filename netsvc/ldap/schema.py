"""
A small built-in LDAP schema: the attribute types and object classes of OpenLDAP's
core, cosine, inetorgperson and nis schemas that directories of people and groups
use (not all of them: enough for the books' examples, posix accounts and groups).

What it decides:
  - L{Schema.attribute}: the canonical form of an attribute name (C{commonName},
    C{CN} -> C{cn}), its equality rule and whether it is operational.  Unknown
    names are accepted and compared case-insensitively (as if C{caseIgnoreMatch}).
  - L{normalize}: a value's canonical form under its equality rule, used for the
    indexes and every filter comparison (case-insensitive where the rule says so,
    C{caseExactMatch} attributes exact, integers numerically, DNs as DNs).
  - L{Schema.superclasses}: an object class and its ancestors, so that
    C{(objectClass=person)} matches an C{inetOrgPerson}.
  - the RFC 4512 descriptions served in the subschema entry (C{cn=Subschema}).

The schema is not enforced on the loaded entries (MUST/MAY are advertised, not
checked): the directory serves whatever the LDIF holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SPACES = re.compile(r"\s+")

DSTRING = "1.3.6.1.4.1.1466.115.121.1.15"
IA5 = "1.3.6.1.4.1.1466.115.121.1.26"
DN = "1.3.6.1.4.1.1466.115.121.1.12"
INTEGER = "1.3.6.1.4.1.1466.115.121.1.27"
OID = "1.3.6.1.4.1.1466.115.121.1.38"
OCTETS = "1.3.6.1.4.1.1466.115.121.1.40"
PHONE = "1.3.6.1.4.1.1466.115.121.1.50"
BOOLEAN = "1.3.6.1.4.1.1466.115.121.1.7"
TIME = "1.3.6.1.4.1.1466.115.121.1.24"
JPEG = "1.3.6.1.4.1.1466.115.121.1.28"
NAMEUID = "1.3.6.1.4.1.1466.115.121.1.34"
POSTAL = "1.3.6.1.4.1.1466.115.121.1.41"
PRINTABLE = "1.3.6.1.4.1.1466.115.121.1.44"
SUBSTRINGS = "1.3.6.1.4.1.1466.115.121.1.58"
SYNTAXES = {DSTRING: "Directory String", IA5: "IA5 String", DN: "Distinguished Name", INTEGER: "Integer",
            OID: "OID", OCTETS: "Octet String", PHONE: "Telephone Number", BOOLEAN: "Boolean",
            TIME: "Generalized Time", JPEG: "JPEG", NAMEUID: "Name And Optional UID",
            POSTAL: "Postal Address", PRINTABLE: "Printable String", SUBSTRINGS: "Substring Assertion"}

#: matching rule -> (oid, syntax, normalization kind)
RULES = {
    "objectIdentifierMatch": ("2.5.13.0", OID, "oid"),
    "distinguishedNameMatch": ("2.5.13.1", DN, "dn"),
    "caseIgnoreMatch": ("2.5.13.2", DSTRING, "ci"),
    "caseIgnoreOrderingMatch": ("2.5.13.3", DSTRING, "ci"),
    "caseIgnoreSubstringsMatch": ("2.5.13.4", SUBSTRINGS, "ci"),
    "caseExactMatch": ("2.5.13.5", DSTRING, "ce"),
    "caseExactSubstringsMatch": ("2.5.13.7", SUBSTRINGS, "ce"),
    "booleanMatch": ("2.5.13.13", BOOLEAN, "ci"),
    "integerMatch": ("2.5.13.14", INTEGER, "int"),
    "integerOrderingMatch": ("2.5.13.15", INTEGER, "int"),
    "octetStringMatch": ("2.5.13.17", OCTETS, "octet"),
    "telephoneNumberMatch": ("2.5.13.20", PHONE, "tel"),
    "uniqueMemberMatch": ("2.5.13.23", NAMEUID, "dn"),
    "generalizedTimeMatch": ("2.5.13.27", TIME, "ce"),
    "generalizedTimeOrderingMatch": ("2.5.13.28", TIME, "ce"),
    "caseExactIA5Match": ("1.3.6.1.4.1.1466.109.114.1", IA5, "ce"),
    "caseIgnoreIA5Match": ("1.3.6.1.4.1.1466.109.114.2", IA5, "ci"),
    "caseIgnoreIA5SubstringsMatch": ("1.3.6.1.4.1.1466.109.114.3", SUBSTRINGS, "ci"),
}

_CI = ("caseIgnoreMatch", "caseIgnoreOrderingMatch", "caseIgnoreSubstringsMatch")
_IA5 = ("caseIgnoreIA5Match", None, "caseIgnoreIA5SubstringsMatch")
_CE = ("caseExactMatch", None, "caseExactSubstringsMatch")
_CEIA5 = ("caseExactIA5Match", None, None)
_INT = ("integerMatch", "integerOrderingMatch", None)
_DN = ("distinguishedNameMatch", None, None)
_TEL = ("telephoneNumberMatch", None, None)
_OCT = ("octetStringMatch", None, None)
_TIME = ("generalizedTimeMatch", "generalizedTimeOrderingMatch", None)


@dataclass(frozen=True)
class AttributeType:
    oid: str
    names: tuple[str, ...]
    rules: tuple[str | None, str | None, str | None]  # equality, ordering, substrings
    syntax: str
    single: bool = False
    operational: bool = False
    sup: str | None = None
    #: How values compare: ci, ce, int, dn, oid, octet, tel (see L{normalize}).
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", RULES[self.rules[0]][2] if self.rules[0] else "octet")

    @property
    def name(self) -> str:
        return self.names[0]

    def describe(self) -> str:
        """The RFC 4512 AttributeTypeDescription."""
        names = _qdescrs(self.names)
        parts = [f"( {self.oid} NAME {names}"]
        if self.sup:
            parts.append(f"SUP {self.sup}")
        for keyword, rule in zip(("EQUALITY", "ORDERING", "SUBSTR"), self.rules):
            if rule:
                parts.append(f"{keyword} {rule}")
        parts.append(f"SYNTAX {self.syntax}")
        if self.single:
            parts.append("SINGLE-VALUE")
        if self.operational:
            parts.append("NO-USER-MODIFICATION USAGE directoryOperation")
        return " ".join(parts) + " )"


@dataclass(frozen=True)
class ObjectClass:
    oid: str
    name: str
    sup: str | None
    kind: str  # ABSTRACT, STRUCTURAL, AUXILIARY
    must: tuple[str, ...] = ()
    may: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [f"( {self.oid} NAME '{self.name}'"]
        if self.sup:
            parts.append(f"SUP {self.sup}")
        parts.append(self.kind)
        if self.must:
            parts.append(f"MUST {_oids(self.must)}")
        if self.may:
            parts.append(f"MAY {_oids(self.may)}")
        return " ".join(parts) + " )"


def _qdescrs(names: tuple[str, ...]) -> str:
    return f"'{names[0]}'" if len(names) == 1 else "( " + " ".join(f"'{n}'" for n in names) + " )"


def _oids(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else "( " + " $ ".join(names) + " )"


def _a(oid: str, names: str, rules: tuple, syntax: str, **kw: object) -> AttributeType:
    return AttributeType(oid, tuple(names.split()), rules, syntax, **kw)  # type: ignore[arg-type]


_U = "0.9.2342.19200300.100.1."
_N = "2.16.840.1.113730.3.1."
_P = "1.3.6.1.1.1.1."

ATTRIBUTES = [
    # core (RFC 4512, 4519)
    _a("2.5.4.0", "objectClass", ("objectIdentifierMatch", None, None), OID),
    _a("2.5.4.41", "name", _CI, DSTRING),
    _a("2.5.4.3", "cn commonName", _CI, DSTRING, sup="name"),
    _a("2.5.4.4", "sn surname", _CI, DSTRING, sup="name"),
    _a("2.5.4.42", "givenName gn", _CI, DSTRING, sup="name"),
    _a("2.5.4.43", "initials", _CI, DSTRING, sup="name"),
    _a("2.5.4.44", "generationQualifier", _CI, DSTRING, sup="name"),
    _a("2.5.4.12", "title", _CI, DSTRING, sup="name"),
    _a("2.5.4.6", "c countryName", _CI, PRINTABLE, single=True),
    _a("2.5.4.7", "l localityName", _CI, DSTRING, sup="name"),
    _a("2.5.4.8", "st stateOrProvinceName", _CI, DSTRING, sup="name"),
    _a("2.5.4.9", "street streetAddress", _CI, DSTRING),
    _a("2.5.4.10", "o organizationName", _CI, DSTRING, sup="name"),
    _a("2.5.4.11", "ou organizationalUnitName", _CI, DSTRING, sup="name"),
    _a("2.5.4.13", "description", _CI, DSTRING),
    _a("2.5.4.15", "businessCategory", _CI, DSTRING),
    _a("2.5.4.16", "postalAddress", _CI, POSTAL),
    _a("2.5.4.17", "postalCode", _CI, DSTRING),
    _a("2.5.4.18", "postOfficeBox", _CI, DSTRING),
    _a("2.5.4.19", "physicalDeliveryOfficeName", _CI, DSTRING),
    _a("2.5.4.20", "telephoneNumber", _TEL, PHONE),
    _a("2.5.4.23", "facsimileTelephoneNumber", _TEL, PHONE),
    _a("2.5.4.49", "distinguishedName", _DN, DN),
    _a("2.5.4.31", "member", _DN, DN, sup="distinguishedName"),
    _a("2.5.4.32", "owner", _DN, DN, sup="distinguishedName"),
    _a("2.5.4.33", "roleOccupant", _DN, DN, sup="distinguishedName"),
    _a("2.5.4.34", "seeAlso", _DN, DN, sup="distinguishedName"),
    _a("2.5.4.50", "uniqueMember", ("uniqueMemberMatch", None, None), NAMEUID),
    _a("2.5.4.35", "userPassword", _OCT, OCTETS),
    _a(_U + "25", "dc domainComponent", _IA5, IA5, single=True),
    _a(_U + "1", "uid userid", _CI, DSTRING),
    _a(_U + "3", "mail rfc822Mailbox", _IA5, IA5),
    # cosine
    _a(_U + "6", "roomNumber", _CI, DSTRING),
    _a(_U + "9", "host", _CI, DSTRING),
    _a(_U + "10", "manager", _DN, DN),
    _a(_U + "20", "homePhone", _TEL, PHONE),
    _a(_U + "21", "secretary", _DN, DN),
    _a(_U + "37", "associatedDomain", _IA5, IA5),
    _a(_U + "39", "homePostalAddress", _CI, POSTAL),
    _a(_U + "41", "mobile", _TEL, PHONE),
    _a(_U + "42", "pager", _TEL, PHONE),
    _a(_U + "60", "jpegPhoto", _OCT, JPEG),
    # inetorgperson (RFC 2798)
    _a(_N + "1", "carLicense", _CI, DSTRING),
    _a(_N + "2", "departmentNumber", _CI, DSTRING),
    _a(_N + "241", "displayName", _CI, DSTRING, single=True),
    _a(_N + "3", "employeeNumber", _CI, DSTRING, single=True),
    _a(_N + "4", "employeeType", _CI, DSTRING),
    _a(_N + "39", "preferredLanguage", _CI, DSTRING, single=True),
    _a("1.3.6.1.4.1.250.1.57", "labeledURI", _CE, DSTRING),
    # nis (RFC 2307)
    _a(_P + "0", "uidNumber", _INT, INTEGER, single=True),
    _a(_P + "1", "gidNumber", _INT, INTEGER, single=True),
    _a(_P + "2", "gecos", _IA5, IA5, single=True),
    _a(_P + "3", "homeDirectory", _CEIA5, IA5, single=True),
    _a(_P + "4", "loginShell", _CEIA5, IA5, single=True),
    _a(_P + "5", "shadowLastChange", _INT, INTEGER, single=True),
    _a(_P + "6", "shadowMin", _INT, INTEGER, single=True),
    _a(_P + "7", "shadowMax", _INT, INTEGER, single=True),
    _a(_P + "8", "shadowWarning", _INT, INTEGER, single=True),
    _a(_P + "9", "shadowInactive", _INT, INTEGER, single=True),
    _a(_P + "10", "shadowExpire", _INT, INTEGER, single=True),
    _a(_P + "11", "shadowFlag", _INT, INTEGER, single=True),
    _a(_P + "12", "memberUid", ("caseExactIA5Match", None, "caseExactSubstringsMatch"), IA5),
    # operational (RFC 4512, 4530, 5020, 3045)
    _a("2.5.18.1", "createTimestamp", _TIME, TIME, single=True, operational=True),
    _a("2.5.18.2", "modifyTimestamp", _TIME, TIME, single=True, operational=True),
    _a("2.5.18.9", "hasSubordinates", ("booleanMatch", None, None), BOOLEAN, single=True, operational=True),
    _a("2.5.18.10", "subschemaSubentry", _DN, DN, single=True, operational=True),
    _a("2.5.21.9", "structuralObjectClass", ("objectIdentifierMatch", None, None), OID, single=True,
       operational=True),
    _a("1.3.6.1.1.20", "entryDN", _DN, DN, single=True, operational=True),
    _a("2.5.21.4", "matchingRules", ("objectIdentifierMatch", None, None), DSTRING, operational=True),
    _a("2.5.21.5", "attributeTypes", ("objectIdentifierMatch", None, None), DSTRING, operational=True),
    _a("2.5.21.6", "objectClasses", ("objectIdentifierMatch", None, None), DSTRING, operational=True),
    _a("1.3.6.1.4.1.1466.101.120.16", "ldapSyntaxes", ("objectIdentifierMatch", None, None), DSTRING,
       operational=True),
    _a("1.3.6.1.4.1.1466.101.120.5", "namingContexts", _DN, DN, operational=True),
    _a("1.3.6.1.4.1.1466.101.120.7", "supportedExtension", ("objectIdentifierMatch", None, None), OID,
       operational=True),
    _a("1.3.6.1.4.1.1466.101.120.13", "supportedControl", ("objectIdentifierMatch", None, None), OID,
       operational=True),
    _a("1.3.6.1.4.1.1466.101.120.14", "supportedSASLMechanisms", _CI, DSTRING, operational=True),
    _a("1.3.6.1.4.1.1466.101.120.15", "supportedLDAPVersion", _INT, INTEGER, operational=True),
    _a("1.3.6.1.4.1.4203.1.3.5", "supportedFeatures", ("objectIdentifierMatch", None, None), OID,
       operational=True),
    _a("1.3.6.1.1.4", "vendorName", _CE, DSTRING, single=True, operational=True),
    _a("1.3.6.1.1.5", "vendorVersion", _CE, DSTRING, single=True, operational=True),
]

_PERSON_MAY = ("userPassword", "telephoneNumber", "seeAlso", "description")
_ORGPERSON_MAY = ("title", "ou", "st", "l", "street", "postalAddress", "postalCode", "postOfficeBox",
                  "physicalDeliveryOfficeName", "facsimileTelephoneNumber")
_INETORG_MAY = ("carLicense", "departmentNumber", "displayName", "employeeNumber", "employeeType",
                "givenName", "homePhone", "homePostalAddress", "initials", "jpegPhoto", "labeledURI",
                "mail", "manager", "mobile", "o", "pager", "preferredLanguage", "roomNumber", "secretary",
                "uid")

OBJECT_CLASSES = [
    ObjectClass("2.5.6.0", "top", None, "ABSTRACT", ("objectClass",)),
    ObjectClass("2.5.6.2", "country", "top", "STRUCTURAL", ("c",), ("description",)),
    ObjectClass("2.5.6.3", "locality", "top", "STRUCTURAL", (), ("street", "seeAlso", "st", "l", "description")),
    ObjectClass("2.5.6.4", "organization", "top", "STRUCTURAL", ("o",),
                ("userPassword", "businessCategory", "telephoneNumber", "street", "postalCode", "l", "st",
                 "description", "seeAlso")),
    ObjectClass("2.5.6.5", "organizationalUnit", "top", "STRUCTURAL", ("ou",),
                ("userPassword", "businessCategory", "telephoneNumber", "street", "postalCode", "l", "st",
                 "description", "seeAlso")),
    ObjectClass("2.5.6.6", "person", "top", "STRUCTURAL", ("sn", "cn"), _PERSON_MAY),
    ObjectClass("2.5.6.7", "organizationalPerson", "person", "STRUCTURAL", (), _ORGPERSON_MAY),
    ObjectClass("2.16.840.1.113730.3.2.2", "inetOrgPerson", "organizationalPerson", "STRUCTURAL", (),
                _INETORG_MAY),
    ObjectClass("2.5.6.8", "organizationalRole", "top", "STRUCTURAL", ("cn",),
                ("roleOccupant", "telephoneNumber", "seeAlso", "ou", "l", "description")),
    ObjectClass("2.5.6.9", "groupOfNames", "top", "STRUCTURAL", ("member", "cn"),
                ("businessCategory", "seeAlso", "owner", "ou", "o", "description")),
    ObjectClass("2.5.6.17", "groupOfUniqueNames", "top", "STRUCTURAL", ("uniqueMember", "cn"),
                ("businessCategory", "seeAlso", "owner", "ou", "o", "description")),
    ObjectClass("1.3.6.1.4.1.1466.344", "dcObject", "top", "AUXILIARY", ("dc",)),
    ObjectClass("0.9.2342.19200300.100.4.13", "domain", "top", "STRUCTURAL", ("dc",),
                ("userPassword", "telephoneNumber", "street", "l", "st", "description", "o", "associatedDomain")),
    ObjectClass("0.9.2342.19200300.100.4.5", "account", "top", "STRUCTURAL", ("uid",),
                ("description", "seeAlso", "l", "o", "ou", "host")),
    ObjectClass("0.9.2342.19200300.100.4.19", "simpleSecurityObject", "top", "AUXILIARY", ("userPassword",)),
    ObjectClass("1.3.6.1.1.3.1", "uidObject", "top", "AUXILIARY", ("uid",)),
    ObjectClass("1.3.6.1.1.1.2.0", "posixAccount", "top", "AUXILIARY",
                ("cn", "uid", "uidNumber", "gidNumber", "homeDirectory"),
                ("userPassword", "loginShell", "gecos", "description")),
    ObjectClass("1.3.6.1.1.1.2.1", "shadowAccount", "top", "AUXILIARY", ("uid",),
                ("userPassword", "shadowLastChange", "shadowMin", "shadowMax", "shadowWarning", "shadowInactive",
                 "shadowExpire", "shadowFlag", "description")),
    ObjectClass("1.3.6.1.1.1.2.2", "posixGroup", "top", "STRUCTURAL", ("cn", "gidNumber"),
                ("userPassword", "memberUid", "description")),
    ObjectClass("1.3.6.1.4.1.1466.101.120.111", "extensibleObject", "top", "AUXILIARY"),
    ObjectClass("2.5.17.0", "subentry", "top", "STRUCTURAL", ("cn",)),
    ObjectClass("2.5.20.1", "subschema", None, "AUXILIARY", (),
                ("ldapSyntaxes", "matchingRules", "attributeTypes", "objectClasses")),
]

#: An attribute type for names the schema does not know: compared case-insensitively.
#: Attribute types the schema does not know that are remembered (names from LDIF files, filters,
#: attribute lists), and how long their names may be: requests can hold any number of new ones.
MAX_UNKNOWN = 4096
MAX_UNKNOWN_NAME = 128


def _unknown(name: str) -> AttributeType:
    return AttributeType(name.lower(), (name,), _CI, DSTRING)


class Schema:
    """Lookups over L{ATTRIBUTES} and L{OBJECT_CLASSES} (case-insensitive, by name or OID)."""

    def __init__(self, attributes: list[AttributeType] = ATTRIBUTES,
                 objectClasses: list[ObjectClass] = OBJECT_CLASSES) -> None:
        self.attributes = attributes
        self.objectClasses = objectClasses
        self._attrs: dict[str, AttributeType] = {}
        self._unknown: dict[str, AttributeType] = {}  # bounded (MAX_UNKNOWN)
        for a in attributes:
            self._attrs[a.oid] = a
            for n in a.names:
                self._attrs[n.lower()] = a
        self._classes: dict[str, ObjectClass] = {}
        for c in objectClasses:
            self._classes[c.name.lower()] = c
            self._classes[c.oid] = c
        self._supers: dict[str, frozenset[str]] = {}

    def attribute(self, name: str) -> AttributeType:
        """The attribute type called C{name} (any alias, any case, or its OID)."""
        key = name.lower()
        found = self._attrs.get(key)
        if found is None:
            found = self._unknown.get(key)
            if found is None:
                found = _unknown(name)
                if len(self._unknown) < MAX_UNKNOWN and len(key) <= MAX_UNKNOWN_NAME:
                    self._unknown[key] = found
        return found

    def canonical(self, name: str) -> str:
        """The lower-case primary name of an attribute: the key entries and filters use."""
        return self.attribute(name).name.lower()

    def objectClass(self, name: str) -> ObjectClass | None:
        return self._classes.get(name.lower())

    def superclasses(self, name: str) -> frozenset[str]:
        """C{name} and its ancestors, canonical lower-case names (an unknown class: just itself)."""
        key = name.lower()
        found = self._supers.get(key)
        if found is None:
            out = []
            c = self._classes.get(key)
            if c is None:
                out.append(key)
            while c is not None and len(out) < 32:
                out.append(c.name.lower())
                c = self._classes.get(c.sup.lower()) if c.sup else None
            found = self._supers[key] = frozenset(out)
        return found

    def subschemaValues(self) -> dict[str, list[bytes]]:
        """The subschema entry's description attributes."""
        return {
            "ldapSyntaxes": [f"( {oid} DESC '{desc}' )".encode() for oid, desc in SYNTAXES.items()],
            "matchingRules": [f"( {oid} NAME '{name}' SYNTAX {syntax} )".encode()
                              for name, (oid, syntax, _) in RULES.items()],
            "attributeTypes": [a.describe().encode() for a in self.attributes],
            "objectClasses": [c.describe().encode() for c in self.objectClasses],
        }


def normalize(kind: str, value: bytes) -> bytes:
    """
    The canonical form of C{value} under a comparison kind (L{AttributeType.kind}):
    C{ci} case-folded with spaces collapsed, C{ce} spaces collapsed, C{tel} without
    spaces and hyphens, C{int} a canonical decimal, C{dn} a normalized DN, C{oid}
    lower-case, C{octet} unchanged.  A value that is not valid for its kind (an
    integer that is not a number) normalizes to itself with a NUL prefix, so it
    never equals a valid one.
    """
    if kind == "octet":
        return value
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return b"\0" + value
    if kind == "ci" or kind == "oid":
        return _SPACES.sub(" ", text.strip()).casefold().encode("utf-8")
    if kind == "ce":
        return _SPACES.sub(" ", text.strip()).encode("utf-8")
    if kind == "tel":
        return re.sub(r"[\s-]+", "", text).casefold().encode("utf-8")
    if kind == "int":
        try:
            return str(int(text.strip())).encode("ascii")
        except ValueError:
            return b"\0" + value
    if kind == "dn":
        from netsvc.ldap.dn import DNError, normalizeDN

        try:
            return normalizeDN(text).encode("utf-8")
        except DNError:
            return b"\0" + value
    return value


#: The one schema the directory uses.
SCHEMA = Schema()
