//! QUIC ingest gateway: mTLS termination, framing, checksums, chunk writes
