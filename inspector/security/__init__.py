"""Security primitives shared by the station and the line: :mod:`.passwords` (scrypt password
hashing and checking, login throttling). Both the web station's login and the OPC UA server's
users check passwords here, so the line never depends on the station."""
