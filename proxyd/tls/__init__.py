"""TLS without terminating it: reading the ClientHello that decides a connection.

- :mod:`.clienthello`: the sans-IO ClientHello reader (record and handshake framing, the
  ``server_name``, ``application_layer_protocol_negotiation`` and ``supported_versions``
  extensions) and the ``access_denied`` alert proxyd answers a refused client with.

The ``serverNames`` patterns of a policy are matched by :mod:`proxyd.policy.servernames`.
"""
