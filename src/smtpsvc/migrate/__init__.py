"""Moving from IIS: read an IIS 6 metabase (MetaBase.xml) or its IIS 7+ WMI export and write the smtpsvc.toml
that does the same job (`smtpsvc import iis`).

``metabase`` reads either file into plain properties per virtual server and domain, ``ipseclist`` decodes
the binary IP lists (RelayIpList, IPSecurity), ``iis`` maps the properties to smtpsvc keys (pure, with a
report of what has no equivalent) and ``tomlout`` writes the commented TOML.
"""

from __future__ import annotations


class ImportFailed(ValueError):
    """The input cannot be imported; the message is one line an IIS administrator can act on."""
