"""Automatic HTTPS: certificates obtained and renewed by the gate (docs/DESIGN.md section 8).

With ``[acme]`` set and ``acme = true`` in a listener's TLS block, the gate
orders one certificate for ``acme.domains`` from the ACME directory (RFC
8555; Let's Encrypt by default), keeps it with the account key in
``acme.state_dir``, serves it, and renews it before it expires, with no
restart and no dropped connection.

The rooms, each with one job:

- :mod:`.service` the process's view: start, reload, stop, metrics, and the
  hooks the listeners call;
- :mod:`.manager` the schedule and the attempts, in the one process that
  holds the state directory's lock;
- :mod:`.client` the conversation with the CA, blocking, on certbot's
  ``acme`` library (run in a thread);
- :mod:`.store` the files: layout, permissions (0700 / 0600), atomic
  replacement, the lock;
- :mod:`.serving` what every process serves: the certificate (swapped when
  the stored file changes) and the answers to HTTP-01 and TLS-ALPN-01;
- :mod:`.front` the accept loop of a TLS listener that answers TLS-ALPN-01,
  which must read the ClientHello before TLS starts;
- :mod:`.certs` keys, CSRs, the temporary and the challenge certificates;
- :mod:`.schedule` and :mod:`.clienthello` pure rules: when to renew and
  retry; what a ClientHello asks for.

Processes share nothing but the state directory: the one that renews writes
the certificate and the open challenges there, every process (each worker,
or a second gate on the same directory) reads them.

Nothing is imported here: the gate imports :mod:`.service` (and with it the
``acme`` library) only when the config has an ``[acme]`` section.
"""
