"""The enforcement kernel: everything that decides "is this token alive, and may it do this?".

One pure package used alike by the service, the guard SDK and the detector, so the three
can never disagree:

* ``errors``    — the error tree and its RFC 9457 problem slugs
* ``clock``     — time as a port
* ``ids``       — task ids and SPIFFE IDs
* ``scopes``    — the grant grammar, matching and attenuation
* ``resources`` — canonical resources (RFC 3986), applied before every match
* ``events``    — the Kafka event contracts and their one typed decoder
* ``jwk``       — JWK conversion and RFC 7638 thumbprints
* ``jws``       — base64url, the ES256/EdDSA signature codec and verification
* ``tokens``    — the ``at+jwt`` header and claims rules (``TokenClaims``), the jti hash
* ``deny``      — the deny state: how each revocation kind applies, and why a token is dead

It must never do I/O: no sockets, no files, no database, no Kafka, no litestar; it reads
no clock except through an injected one. ``tests/test_layers.py`` (import-linter) holds
it to that.
"""
