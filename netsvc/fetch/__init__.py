"""
C{netsvc fetch}, the HTTP(S) client (curl/wget habits), on treq.

Modules, each importing only those after it:

  - C{cli}: the command line (C{addParser}, C{fetch}); its docstring is the C{--help} text.
  - C{fetcher}: L{Fetcher}, one run: mirrors, redirects, resume, retries.
  - C{request}: what is sent: URLs, C{-H} headers, upload bodies, the wire agent.
  - C{body}: where a response body goes: decoders, sinks, the body receiver.
  - C{progress}: the progress bar; C{cookies}: the curl-compatible cookie jar.
  - C{errors}: L{Usage}, L{Failed}, C{describe}.

The server side of HTTP is in L{netsvc.web}; nothing here imports it.
"""
