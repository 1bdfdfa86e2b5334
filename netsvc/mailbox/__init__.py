"""Mailboxes: the Maildir++ store (L{netsvc.mailbox.maildir}) and the IMAP and POP3 servers over it."""
